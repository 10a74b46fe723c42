//! The `kms-sidecar` binary: parse configuration, set up logging, run the
//! sidecar or a client subcommand.

#![allow(
    clippy::print_stdout,
    reason = "the `config` and `check` subcommands print their report on stdout"
)]

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use kms_sidecar::client::{self, ClientError};
use kms_sidecar::config::{Args, Cli, ClientCommand, ClientIo, Command, Config, HealthArgs};

fn main() -> ExitCode {
    let argv = match kms_sidecar::config::argv_with_config_file(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kms-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kms-sidecar: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let otel = match &cli.command {
        None => cli.serve.otel,
        Some(Command::Serve(args)) => args.otel,
        Some(_) => false,
    };
    let telemetry = {
        let _guard = runtime.enter();
        match kms_sidecar::telemetry::init(otel) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("kms-sidecar: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let code = run_command(&runtime, cli);
    telemetry.shutdown();
    code
}

fn run_command(runtime: &tokio::runtime::Runtime, cli: Cli) -> ExitCode {
    match cli.command {
        None => serve(runtime, cli.serve),
        Some(Command::Serve(args)) => serve(runtime, args),
        Some(Command::Health(args)) => health(runtime, &args),
        Some(Command::Check(args)) => check(runtime, args),
        Some(Command::Config(args)) => match Config::try_from(args) {
            Ok(c) => {
                print!("{c}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kms-sidecar: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Client(cmd)) => match runtime.block_on(run_client(cmd)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kms-sidecar: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn serve(runtime: &tokio::runtime::Runtime, args: Args) -> ExitCode {
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kms-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    // Handlers are installed before anything binds: a SIGTERM that arrives
    // during start-up still shuts down cleanly instead of killing the process.
    let shutdown = {
        let _guard = runtime.enter();
        shutdown_signal()
    };
    match runtime.block_on(kms_sidecar::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(runtime: &tokio::runtime::Runtime, args: Args) -> ExitCode {
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kms-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(kms_sidecar::preflight::run(&config));
    print!("{report}");
    if report.can_serve {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn health(runtime: &tokio::runtime::Runtime, args: &HealthArgs) -> ExitCode {
    use tonic_health::pb::health_check_response::ServingStatus;
    let target = args.target();
    match runtime.block_on(client::health(&target, &args.service, args.timeout)) {
        Ok(ServingStatus::Serving) => {
            println!("{target} {:?}: SERVING", args.service);
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!(
                "kms-sidecar: {target} service {:?} is {}",
                args.service,
                status.as_str_name()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("kms-sidecar: health check of {target} failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_client(cmd: ClientCommand) -> Result<(), ClientError> {
    let io = match &cmd {
        ClientCommand::Wrap(w) => &w.io,
        ClientCommand::Unwrap(io) => io,
    };
    let channel = client::connect(&io.addr)
        .await
        .map_err(|source| ClientError::Connect {
            target: io.addr.clone(),
            source,
        })?;
    let context: HashMap<String, String> = io.context.iter().cloned().collect();
    let input = open_input(io).await?;
    let chunk = client::DEFAULT_CHUNK_BYTES;
    let (key_id, bytes) = match (&cmd, is_stdio(&io.output)) {
        (ClientCommand::Wrap(w), true) => {
            client::wrap_stream(
                channel,
                w.key_id.clone(),
                context,
                w.frame_length,
                input,
                &mut tokio::io::stdout(),
                chunk,
            )
            .await?
        }
        (ClientCommand::Wrap(w), false) => {
            let mut file = tokio::fs::File::create(&io.output).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", io.output.display()),
                )
            })?;
            let result = client::wrap_stream(
                channel,
                w.key_id.clone(),
                context,
                w.frame_length,
                input,
                &mut file,
                chunk,
            )
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&io.output).await;
            }
            result?
        }
        (ClientCommand::Unwrap(_), true) => {
            client::unwrap_stream(channel, context, input, &mut tokio::io::stdout(), chunk).await?
        }
        (ClientCommand::Unwrap(_), false) => {
            client::unwrap_stream_to_file(channel, context, input, &io.output, chunk).await?
        }
    };
    tracing::debug!(key_id, plaintext_bytes = bytes, "done");
    Ok(())
}

fn is_stdio(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

async fn open_input(
    io: &ClientIo,
) -> Result<Box<dyn tokio::io::AsyncRead + Unpin + Send>, ClientError> {
    if is_stdio(&io.input) {
        Ok(Box::new(tokio::io::stdin()))
    } else {
        let file = tokio::fs::File::open(&io.input).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot read {}: {e}", io.input.display()))
        })?;
        Ok(Box::new(file))
    }
}

/// Installs the SIGTERM and SIGINT handlers now (inside the runtime) and
/// returns a future that resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
            }
            _ => {
                tracing::warn!("cannot install signal handlers; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
