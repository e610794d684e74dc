//! controllers: the controller manager's controllers, all on kube-runtime, all reaching the
//! cluster only through the API server with a kubeconfig.
//!
//! Today: the namespace controller, the ServiceAccount controller and node IPAM. The node lifecycle, workload, endpoints and garbage
//! collection controllers join here (one file or folder each) on the same runtime.

pub mod claim;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub use events;
pub mod gc;
pub mod leader;
pub mod namespace;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod pods;
pub mod replicaset;
pub mod runtime;
pub mod serviceaccount;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, ReplicationController, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client};

/// Concurrent reconciles per workload controller. Upstream's `--concurrent-*-syncs` default to
/// 5; a ReplicaSet sync here waits on a few sequential creates (slow start), so more workers
/// keep the API busy: 16 created pods twice as fast as 5 in `rkube-bench deployments`.
const WORKERS: usize = 16;

/// What the controllers are configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Pod CIDRs for nodes are cut from this range (`--cluster-cidr`).
    pub cluster_cidr: nodeipam::ClusterCidr,
    pub node_lifecycle: nodelifecycle::Settings,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            cluster_cidr: nodeipam::ClusterCidr::parse(DEFAULT_CLUSTER_CIDR, 24)
                .expect("the default cluster CIDR parses"),
            node_lifecycle: nodelifecycle::Settings::default(),
        }
    }
}

/// Upstream k3s's default, as CONTRACT.md and the issues name it.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.42.0.0/16";

/// Run every controller, while this process holds the `kube-controller-manager` lease in
/// kube-system (so two copies can run: the standby takes over within a lease duration), until
/// `shutdown` resolves.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let work = || {
        let (client, config) = (client.clone(), config.clone());
        async move {
            let recorder = events::Recorder::new(client.clone(), "controller-manager");
            // The garbage collector follows these informers instead of watching again.
            let mut shared = gc::Shared::default();
            let pods = runtime::start_trimmed(
                Api::<Pod>::all(client.clone()),
                Default::default(),
                pods::trim_for_controllers,
            );
            shared.add(&pods);
            let replicasets =
                runtime::start(Api::<ReplicaSet>::all(client.clone()), Default::default());
            shared.add(&replicasets);
            let rs = replicaset::ReplicaController::new(
                client.clone(),
                replicasets.clone(),
                pods.clone(),
                recorder.named("replicaset-controller"),
            );
            let deployment_informer =
                runtime::start(Api::<Deployment>::all(client.clone()), Default::default());
            shared.add(&deployment_informer);
            let deployments = deployment::DeploymentController::new(
                client.clone(),
                deployment_informer,
                replicasets,
                pods.clone(),
                recorder.named("deployment-controller"),
            );
            let rcs = runtime::start(
                Api::<ReplicationController>::all(client.clone()),
                Default::default(),
            );
            shared.add(&rcs);
            let rc = replicaset::ReplicaController::new(
                client.clone(),
                rcs,
                pods.clone(),
                recorder.named("replication-controller"),
            );
            let nodes = runtime::start(Api::<Node>::all(client.clone()), Default::default());
            shared.add(&nodes);
            let daemonset_informer =
                runtime::start(Api::<DaemonSet>::all(client.clone()), Default::default());
            shared.add(&daemonset_informer);
            let revisions = runtime::start(
                Api::<ControllerRevision>::all(client.clone()),
                Default::default(),
            );
            shared.add(&revisions);
            let daemonsets = daemonset::DaemonSetController::new(
                client.clone(),
                daemonset_informer,
                nodes.clone(),
                pods.clone(),
                revisions,
                recorder.named("daemonset-controller"),
            );
            let services = runtime::start(Api::<Service>::all(client.clone()), Default::default());
            shared.add(&services);
            let endpoint_informer =
                runtime::start(Api::<Endpoints>::all(client.clone()), Default::default());
            shared.add(&endpoint_informer);
            let slices = runtime::start(
                Api::<EndpointSlice>::all(client.clone()),
                Default::default(),
            );
            shared.add(&slices);
            let endpoints = endpoints::EndpointsController::new(
                client.clone(),
                services,
                pods.clone(),
                nodes.clone(),
                endpoint_informer,
                slices,
            );
            // Leases: only kube-node-lease's are watched here, so the collector keeps its own.
            let lifecycle = nodelifecycle::NodeLifecycle::new(
                client.clone(),
                config.node_lifecycle.clone(),
                nodes.clone(),
                runtime::start(
                    Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
                    Default::default(),
                ),
                pods.clone(),
                recorder.named("node-controller"),
            );
            tokio::select! {
                _ = lifecycle.run() => {}
                _ = endpoints.run(WORKERS) => {}
                _ = daemonsets.run(WORKERS) => {}
                r = gc::run(client.clone(), shared) => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "garbage collector stopped");
                    }
                }
                _ = rs.run(WORKERS) => {}
                _ = deployments.run(WORKERS) => {}
                _ = rc.run(WORKERS) => {}
                _ = nodeipam::run(client.clone(), config.cluster_cidr) => {}
                _ = namespace::run(client.clone()) => {}
                _ = serviceaccount::run(client) => {}
            }
        }
    };
    leader::lead(client.clone(), "kube-controller-manager", work, shutdown).await;
}
