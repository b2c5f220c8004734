//! Receipts of a shard another replica sequences, passed on to it (`docs/credits.md`, Shards).
//!
//! A node sends its whole batch to whichever replica it talks to. That replica redeems the shards it
//! sequences and passes the node's signed batch on, once, to the holder of each other shard's lease,
//! wrapped in a message signed with the tracker key the replicas share and naming the shards to redeem
//! there. The holder trusts only that signature (no source limit: the forwarding replica applied it) and
//! passes nothing on again, so a batch makes at most one more hop. Nodes stay as they were: one batch,
//! one answer, in which receipts not redeemed anywhere now are simply missing (the node keeps them).

use std::time::Duration;

use fog_proto::api::Signed;
use fog_proto::credits::RedeemResponse;
use serde::{Deserialize, Serialize};

/// The kind of the replicas' signed forwards.
pub const KIND_FORWARD: &str = "ledger-forward";
/// The path a replica takes forwards at.
pub const FORWARD_PATH: &str = "/v1/ledger/forward";
/// How long a forward may take, the holder's append included.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from a holder: a batch's answers are well below it.
const MAX_ANSWER: usize = 1 << 20;

/// A node's signed batch, and the shards whose receipts the receiving replica is to redeem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forward {
    pub shards: Vec<u32>,
    pub batch: Signed,
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("passing receipts on to {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("{url} answered more than {MAX_ANSWER} bytes")]
    TooLong { url: String },
    #[error("{url} answered something that is not a redemption answer: {source}")]
    Json { url: String, source: serde_json::Error },
}

/// Sends `forward` (signed with the tracker key) to the replica at `url` and returns its answers.
pub async fn forward(client: &reqwest::Client, url: &str, forward: &Signed) -> Result<RedeemResponse, ForwardError> {
    let http = |source| ForwardError::Http { url: url.to_string(), source };
    let mut resp = client
        .post(format!("{url}{FORWARD_PATH}"))
        .timeout(FORWARD_TIMEOUT)
        .json(forward)
        .send()
        .await
        .map_err(http)?;
    let status = resp.status();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(http)? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(ForwardError::TooLong { url: url.to_string() });
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let body = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(ForwardError::Status { url: url.to_string(), status: status.as_u16(), body });
    }
    serde_json::from_slice(&body).map_err(|source| ForwardError::Json { url: url.to_string(), source })
}
