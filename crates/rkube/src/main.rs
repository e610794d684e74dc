//! rkube: the Kubernetes architecture in one binary. This crate is the command line, the
//! supervisor that starts the components in order, and tracing set-up; the components live in
//! their own crates and meet only through the API server.

mod certs;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc returns freed memory to the system and fragments less than glibc's allocator under a
/// server's many threads: measured on a 100k-pod LIST workload (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "rkube",
    version,
    about = "The Kubernetes architecture, in Rust, in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One whole cluster on this machine: storage and the API server (more components as they land).
    Server(server::ServerArgs),
    /// A worker node joining a server (kubelet + proxy).
    Agent {
        /// The API server's URL (the `server:` of the server's kubeconfig).
        #[arg(long, env = "RKUBE_SERVER")]
        server: String,
        /// The server's `<data-dir>/token`.
        #[arg(long, env = "RKUBE_TOKEN")]
        token: String,
        /// Everything this node keeps (its runtime, images, logs) goes under `<data-dir>/agent`.
        #[arg(long, env = "RKUBE_DATA_DIR", default_value = "/var/lib/rkube")]
        data_dir: PathBuf,
        #[command(flatten)]
        node: server::NodeArgs,
    },
    /// The API server alone.
    Apiserver(server::ServerArgs),
    /// The scheduler alone.
    Scheduler {
        #[arg(long)]
        kubeconfig: PathBuf,
        /// A KubeSchedulerConfiguration file (profiles, plugins, weights).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The controller manager alone.
    ControllerManager {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        controllers: server::ControllerArgs,
    },
    /// The kubelet alone: runs this machine's pods through CRI.
    Kubelet {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[command(flatten)]
        node: server::NodeArgs,
    },
    /// Build the images rkube makes for itself (OCI archives): `pause.tar` and `busybox.tar`.
    Images {
        /// Where to write them.
        #[arg(long)]
        out: PathBuf,
        /// The busybox image's name.
        #[arg(long, default_value = kubelet::images::BUSYBOX_IMAGE)]
        busybox_name: String,
    },
    /// The service proxy alone: programs this machine's nftables for Services.
    Proxy {
        #[arg(long)]
        kubeconfig: PathBuf,
        /// This machine's node name (default: the host name).
        #[arg(long, env = "RKUBE_NODE_NAME")]
        node_name: Option<String>,
        /// The pod range traffic counts as local from (default: the node's podCIDR).
        #[arg(long, env = "RKUBE_CLUSTER_CIDR")]
        cluster_cidr: Option<String>,
        /// The nftables table this proxy owns (Services go in `<table>-0` .. `<table>-31`).
        #[arg(long, default_value = "rkube-proxy")]
        table: String,
    },
    /// Move a datastore into an empty etcd cluster: copy every key, advance and compact the
    /// target's history past the source's revision, then compare both. Stop the server first.
    Migrate(server::MigrateArgs),
    /// N simulated nodes in one process.
    HollowNodes {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "hollow-node-")]
        name_prefix: String,
        /// Each node's CPU capacity.
        #[arg(long, default_value = "4")]
        cpu: String,
        /// Each node's memory capacity.
        #[arg(long, default_value = "16Gi")]
        memory: String,
        /// Each node's pod capacity.
        #[arg(long, default_value = "110")]
        max_pods: String,
        /// Extra node labels, `k=v,k2=v2`.
        #[arg(long, default_value = "")]
        node_labels: String,
        /// Zones handed out round-robin as `topology.kubernetes.io/zone`, `a,b,c`.
        #[arg(long, default_value = "")]
        zones: String,
    },
}

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A client for the API server named in a kubeconfig file.
pub async fn client_from_kubeconfig(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// A client for a component running inside `rkube server`: its requests go straight to the
/// API server's handler (`apiserver::Local`), as the admin certificate in the kubeconfig would
/// authenticate them, without a socket, TLS or HTTP framing.
pub fn local_client(local: apiserver::Local) -> kube::Client {
    use http_body_util::BodyExt;
    let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let local = local.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, kube::Error>(local.call(http::Request::from_parts(parts, body)).await)
        }
    });
    kube::Client::new(service, "default")
}

/// The scheduler while it holds the `kube-scheduler` lease (so two can run: the standby takes
/// over within a lease duration), until `shutdown`.
pub async fn run_scheduler(
    client: kube::Client,
    config: scheduler::Configuration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let work = || {
        let (client, config) = (client.clone(), config.clone());
        async move {
            if let Err(e) = scheduler::run(client, config, std::future::pending()).await {
                tracing::error!(error = %e, "scheduler stopped");
            }
        }
    };
    controllers::leader::lead(client.clone(), "kube-scheduler", work, shutdown).await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The API server's runtime uses every core. The components that only talk to it (the
    // scheduler, the controller manager, hollow nodes) get one worker thread: they share the
    // machine with the API server, and there one thread costs 6-8 % less CPU per pod than two
    // (no wake-ups across threads, no work stealing; BENCHMARKS.md, `deployments`). Tokio's
    // TOKIO_WORKER_THREADS sets either.
    let api_client_only = matches!(
        cli.command,
        Command::Scheduler { .. } | Command::ControllerManager { .. } | Command::HollowNodes { .. }
    );
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if api_client_only && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rkube: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Server(args) | Command::Apiserver(args) => runtime.block_on(server::run(args)),
        Command::Agent {
            server,
            token,
            data_dir,
            node,
        } => runtime.block_on(async move {
            let mut config = kube::Config::new(
                server
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--server {server}: {e}"))?,
            );
            config.auth_info.token = Some(token.trim().to_string().into());
            // The join token carries no CA pin yet: the server's certificate is not checked.
            config.accept_invalid_certs = true;
            let client = kube::Client::try_from(config)?;
            let opts = node.options(Some(data_dir.join("agent")))?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let popts = node.proxy_options(&data_dir.join("agent"), None);
            let proxy_task = server::spawn_proxy(client.clone(), popts, stop_rx);
            let res = kubelet::run(client, opts, terminated()).await;
            let _ = stop_tx.send(true);
            if let Some(t) = proxy_task {
                let _ = t.await;
            }
            res
        }),
        Command::Scheduler { kubeconfig, config } => runtime.block_on(async move {
            let config = match config {
                Some(path) => scheduler::Configuration::parse(
                    &std::fs::read_to_string(&path)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
                )?,
                None => scheduler::Configuration::default(),
            };
            config.profiles()?;
            let client = client_from_kubeconfig(&kubeconfig).await?;
            run_scheduler(client, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(())
        }),
        Command::ControllerManager {
            kubeconfig,
            controllers,
        } => runtime.block_on(async move {
            let config = controllers.config()?;
            let client = client_from_kubeconfig(&kubeconfig).await?;
            controllers::run(client, config, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await;
            Ok(())
        }),
        Command::Migrate(args) => runtime.block_on(server::migrate(args)),
        Command::Kubelet { kubeconfig, node } => runtime.block_on(async move {
            let client = client_from_kubeconfig(&kubeconfig).await?;
            kubelet::run(client, node.options(None)?, terminated()).await
        }),
        Command::Images { out, busybox_name } => (|| {
            std::fs::create_dir_all(&out)?;
            let bin = std::path::Path::new(kubelet::images::BUSYBOX_BINARY);
            std::fs::write(out.join("pause.tar"), kubelet::images::pause(bin)?)?;
            std::fs::write(
                out.join("busybox.tar"),
                kubelet::images::busybox(bin, &busybox_name)?,
            )?;
            println!("{}", out.join("pause.tar").display());
            println!("{}", out.join("busybox.tar").display());
            Ok(())
        })(),
        Command::Proxy {
            kubeconfig,
            node_name,
            cluster_cidr,
            table,
        } => runtime.block_on(async move {
            if let Some(why) = proxy::unavailable() {
                anyhow::bail!("{why}");
            }
            let client = client_from_kubeconfig(&kubeconfig).await?;
            let opts = proxy::Options {
                node_name: node_name.unwrap_or_else(server::hostname),
                table,
                cluster_cidr,
            };
            proxy::run(client, opts, terminated()).await
        }),
        Command::HollowNodes {
            kubeconfig,
            count,
            name_prefix,
            cpu,
            memory,
            max_pods,
            node_labels,
            zones,
        } => runtime.block_on(async move {
            let labels = node_labels
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .ok_or_else(|| anyhow::anyhow!("--node-labels: {kv:?} is not k=v"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = hollow::Options {
                count,
                name_prefix,
                cpu,
                memory,
                pods: max_pods,
                labels,
                zones: zones
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
                ..hollow::Options::default()
            };
            let client = client_from_kubeconfig(&kubeconfig).await?;
            hollow::run(client, opts, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rkube: {e:#}");
            ExitCode::FAILURE
        }
    }
}
