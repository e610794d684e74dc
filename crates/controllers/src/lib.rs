//! controllers: the controller manager's controllers, all on kube-runtime, all reaching the
//! cluster only through the API server with a kubeconfig.
//!
//! Today: the namespace controller. The node lifecycle, workload, endpoints and garbage
//! collection controllers join here (one file or folder each) on the same runtime.

pub mod namespace;

use kube::Client;

/// Run every controller until `shutdown` resolves.
pub async fn run(client: Client, shutdown: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::select! {
        _ = namespace::run(client) => {}
        _ = shutdown => {}
    }
}
