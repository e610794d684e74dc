//! Leader election on a coordination.k8s.io Lease, as upstream's components do: the holder renews
//! the lease; a standby takes over once it has not been renewed for a lease duration. Losing the
//! lease stops the work (not the process) and the candidate campaigns again.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease stays valid without renewal (upstream: 15 s).
    pub lease_duration: Duration,
    /// How often the holder renews, and candidates retry (upstream retries every 2 s).
    pub retry_period: Duration,
}

impl Election {
    pub fn new(name: &str, identity: &str) -> Election {
        Election {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// A default identity: host name and process id.
pub fn identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}_{}", host.trim(), std::process::id())
}

/// Try once to hold the lease; Ok(true) when we hold it now.
async fn try_acquire_or_renew(api: &Api<Lease>, e: &Election) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let secs = e.lease_duration.as_secs() as i32;
    match api.get_opt(&e.name).await? {
        None => {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(e.name.clone()),
                    namespace: Some(e.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(e.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(err) => Err(err),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            let valid_for =
                SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(secs) as i64);
            let expired =
                renewed.is_none_or(|t| t.saturating_add(valid_for).is_ok_and(|end| end < now));
            if holder != e.identity && !holder.is_empty() && !expired {
                return Ok(false);
            }
            if holder != e.identity {
                spec.holder_identity = Some(e.identity.clone());
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(secs);
            // A compare-and-swap on resourceVersion: two candidates cannot both win.
            match api.replace(&e.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(err) => Err(err),
            }
        }
    }
}

/// Run `work()` whenever this candidate holds the lease, until `work` ends by itself; a lost
/// lease stops the current run of `work` and the candidate campaigns again.
pub async fn run_elected<F, Fut>(client: Client, e: Election, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    loop {
        // Campaign.
        loop {
            match try_acquire_or_renew(&api, &e).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(err) => {
                    tracing::debug!(error = %err, lease = %e.name, "leader election: campaign")
                }
            }
            tokio::time::sleep(e.retry_period).await;
        }
        tracing::info!(lease = %e.name, identity = %e.identity, "leader election: became the leader");
        // Lead: renew while working; give up if renewals fail for most of a lease duration.
        let renew = async {
            let mut last_ok = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(e.retry_period).await;
                match try_acquire_or_renew(&api, &e).await {
                    Ok(true) => last_ok = tokio::time::Instant::now(),
                    Ok(false) => return,
                    Err(err) => tracing::warn!(error = %err, "leader election: renewal failed"),
                }
                if last_ok.elapsed() > e.lease_duration.mul_f32(0.66) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = work() => return,
            _ = renew => tracing::warn!(lease = %e.name, "leader election: lost the lease; stopping and campaigning again"),
        }
    }
}

/// Give the lease up if this candidate holds it (on a clean shutdown), so that a successor does
/// not wait a lease duration.
pub async fn release(client: Client, e: &Election) {
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&e.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(e.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    if api
        .replace(&e.name, &PostParams::default(), &lease)
        .await
        .is_ok()
    {
        tracing::info!(lease = %e.name, "leader election: released the lease");
    }
}

/// Run `work()` while holding the `name` lease in kube-system, until `shutdown` resolves; then
/// release the lease so that a standby takes over at once.
pub async fn lead<F, Fut>(
    client: Client,
    name: &str,
    work: F,
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let election = Election::new(name, &identity());
    tokio::select! {
        _ = run_elected(client.clone(), election.clone(), work) => {}
        _ = shutdown => release(client, &election).await,
    }
}
