//! The client side of the rendezvous protocol (`fog_proto::rendezvous`): asking a public node to open a path
//! to a node behind NAT, and the one-frame exchange that the node side shares.

use std::net::SocketAddr;
use std::time::Duration;

use fog_proto::api::Rendezvous;
use fog_proto::rendezvous::{Frame, FrameError, ALPN};
use fog_proto::NodeId;

use crate::frame_io::{read_frame, write_last_frame, ReadError};
use crate::transport;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("cannot open a stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("sending a rendezvous frame: {0}")]
    Send(#[source] std::io::Error),
    #[error("{0}")]
    Read(#[from] ReadError<FrameError>),
}

/// Why a punch through a rendezvous failed; the client dials the node some other way or not at all.
#[derive(Debug, thiserror::Error)]
pub enum PunchError {
    #[error("{0}")]
    Connect(#[source] transport::ConnectError),
    #[error("rendezvous {via} did not answer within {after:?}")]
    Timeout { via: SocketAddr, after: Duration },
    #[error("rendezvous {via}: {source}")]
    Exchange {
        via: SocketAddr,
        #[source]
        source: ExchangeError,
    },
    #[error("rendezvous {via} refused: {message}")]
    Refused { via: SocketAddr, message: String },
    #[error("rendezvous {via} answered out of turn: {frame:?}")]
    OutOfTurn { via: SocketAddr, frame: Box<Frame> },
}

/// Asks `via` to open a path to `target`; returns the address to dial the target at.
pub async fn punch(
    endpoint: &quinn::Endpoint,
    via: &Rendezvous,
    target: NodeId,
    timeout: Duration,
) -> Result<SocketAddr, PunchError> {
    let cfg = transport::client_config_for(via.id, timeout * 2, ALPN);
    let conn = transport::connect_with(endpoint, cfg, via.addr, timeout).await.map_err(PunchError::Connect)?;
    let reply = tokio::time::timeout(timeout, exchange(&conn, &Frame::Punch { target })).await;
    conn.close(0u32.into(), b"punched");
    let via = via.addr;
    match reply {
        Err(_) => Err(PunchError::Timeout { via, after: timeout }),
        Ok(Err(source)) => Err(PunchError::Exchange { via, source }),
        Ok(Ok(Frame::PunchReady { addr })) => Ok(addr),
        Ok(Ok(Frame::Error { message })) => Err(PunchError::Refused { via, message }),
        Ok(Ok(frame)) => Err(PunchError::OutOfTurn { via, frame: Box::new(frame) }),
    }
}

/// Sends `frame` on a new bidirectional stream of `conn` and reads the one-frame answer.
pub async fn exchange(conn: &quinn::Connection, frame: &Frame) -> Result<Frame, ExchangeError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_last_frame(&mut send, &frame.encode()).await.map_err(ExchangeError::Send)?;
    Ok(read_frame(&mut recv).await?)
}
