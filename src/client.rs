//! Connecting to a sidecar as a client, over TCP or a Unix socket (for the
//! benchmarks, the tests and command-line tools).

use std::path::PathBuf;

use tonic::transport::{Channel, Endpoint};

/// Opens a channel to `target`: `unix:///path.sock`, `http://host:port` or
/// `host:port`. Unix sockets are reached with `:authority` = `localhost`,
/// which the server's HTTP/2 stack accepts.
///
/// # Errors
/// The transport error of the first connection attempt.
pub async fn connect(target: &str) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = target.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        return Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
    }
    let url = if target.starts_with("http://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    Endpoint::from_shared(url)?.connect().await
}
