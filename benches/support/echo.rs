//! The bare tonic echo service: the transport baseline of the benchmarks
//! (the same messages over the same kind of socket, no crypto, no KMS).

pub mod echo {
    #![allow(missing_docs, clippy::all, reason = "generated code")]
    tonic::include_proto!("bench.echo.v1");
}

#[derive(Default)]
pub struct EchoServer;

#[tonic::async_trait]
impl echo::echo_server::Echo for EchoServer {
    type EchoStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<echo::Chunk, tonic::Status>> + Send>,
    >;

    async fn echo(
        &self,
        request: tonic::Request<tonic::Streaming<echo::Chunk>>,
    ) -> Result<tonic::Response<Self::EchoStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(request.into_inner())))
    }

    async fn unary(
        &self,
        request: tonic::Request<echo::Chunk>,
    ) -> Result<tonic::Response<echo::Chunk>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }
}

/// Serves the echo on `uds` (and `tcp`), with the sidecar's HTTP/2
/// settings, until the process ends.
pub async fn serve(uds: tokio::net::UnixListener, tcp: Option<tokio::net::TcpListener>) {
    let svc = || echo::echo_server::EchoServer::new(EchoServer);
    let a = kms_sidecar::server::http2_settings(tonic::transport::Server::builder())
        .add_service(svc())
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds));
    let b = async move {
        if let Some(tcp) = tcp {
            let _ = kms_sidecar::server::http2_settings(tonic::transport::Server::builder())
                .add_service(svc())
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(tcp).with_nodelay(Some(true)),
                )
                .await;
        }
    };
    let _ = tokio::join!(a, b);
}
