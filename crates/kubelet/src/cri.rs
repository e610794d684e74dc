//! CRI v1 over gRPC to a container runtime's unix socket (k8s-cri + tonic): one channel, shared
//! by the runtime and image services; every call carries a deadline.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub use cri::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to the container runtime at {0}: {1}")]
    Connect(String, tonic::transport::Error),
    #[error("{0}")]
    Call(#[from] tonic::Status),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

/// `unix:///path` or a bare path.
pub fn socket_path(endpoint: &str) -> PathBuf {
    PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint))
}

impl Cri {
    pub async fn connect(endpoint: &str) -> Result<Cri> {
        let path = socket_path(endpoint);
        let shown = path.display().to_string();
        let channel = Endpoint::from_static("http://[::]:50051")
            .timeout(Duration::from_secs(120))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| Error::Connect(shown, e))?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    pub async fn version(&self) -> Result<VersionResponse> {
        Ok(self
            .runtime
            .clone()
            .version(VersionRequest::default())
            .await?
            .into_inner())
    }

    pub async fn sandboxes(&self, labels: &[(&str, &str)]) -> Result<Vec<PodSandbox>> {
        let filter = PodSandboxFilter {
            label_selector: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await?
            .into_inner()
            .items)
    }

    pub async fn sandbox_status(&self, id: &str) -> Result<Option<PodSandboxStatus>> {
        Ok(self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status)
    }

    pub async fn containers(&self, filter: ContainerFilter) -> Result<Vec<Container>> {
        Ok(self
            .runtime
            .clone()
            .list_containers(ListContainersRequest {
                filter: Some(filter),
            })
            .await?
            .into_inner()
            .containers)
    }

    pub async fn container_status(&self, id: &str) -> Result<Option<ContainerStatus>> {
        Ok(self
            .runtime
            .clone()
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status)
    }

    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        self.runtime
            .clone()
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        self.runtime
            .clone()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// The image's id if the runtime has it.
    pub async fn image_present(&self, image: &str) -> Result<Option<String>> {
        Ok(self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner()
            .image
            .map(|i| i.id))
    }

    pub async fn pull(&self, image: &str) -> Result<String> {
        Ok(self
            .images
            .clone()
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .image_ref)
    }

    pub async fn exec_url(&self, req: ExecRequest) -> Result<String> {
        Ok(self.runtime.clone().exec(req).await?.into_inner().url)
    }

    pub async fn attach_url(&self, req: AttachRequest) -> Result<String> {
        Ok(self.runtime.clone().attach(req).await?.into_inner().url)
    }

    pub async fn port_forward_url(&self, sandbox: &str) -> Result<String> {
        Ok(self
            .runtime
            .clone()
            .port_forward(PortForwardRequest {
                pod_sandbox_id: sandbox.into(),
                port: Vec::new(),
            })
            .await?
            .into_inner()
            .url)
    }
}
