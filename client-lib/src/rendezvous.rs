//! The client side of the rendezvous protocol (`fog_proto::rendezvous`): asking a public node to open a path
//! to a node behind NAT, and the frame I/O that the node side shares.

use std::net::SocketAddr;
use std::time::Duration;

use fog_proto::api::Rendezvous;
use fog_proto::rendezvous::{Frame, ALPN};
use fog_proto::NodeId;

use crate::transport;

/// Asks `via` to open a path to `target`; returns the address to dial the target at.
pub async fn punch(
    endpoint: &quinn::Endpoint,
    via: &Rendezvous,
    target: NodeId,
    timeout: Duration,
) -> Result<SocketAddr, String> {
    let cfg = transport::client_config_for(via.id, timeout * 2, ALPN);
    let conn = transport::connect_with(endpoint, cfg, via.addr, timeout).await?;
    let reply = tokio::time::timeout(timeout, exchange(&conn, &Frame::Punch { target })).await;
    conn.close(0u32.into(), b"punched");
    match reply {
        Err(_) => Err(format!("rendezvous {} did not answer within {timeout:?}", via.addr)),
        Ok(Err(e)) => Err(format!("rendezvous {}: {e}", via.addr)),
        Ok(Ok(Frame::PunchReady { addr })) => Ok(addr),
        Ok(Ok(Frame::Error { message })) => Err(format!("rendezvous {} refused: {message}", via.addr)),
        Ok(Ok(other)) => Err(format!("rendezvous {} answered out of turn: {other:?}", via.addr)),
    }
}

/// Sends `frame` on a new bidirectional stream of `conn` and reads the one-frame answer.
pub async fn exchange(conn: &quinn::Connection, frame: &Frame) -> Result<Frame, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, frame).await?;
    read_frame(&mut recv).await
}

pub async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), String> {
    send.write_all(&frame.encode()).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(())
}

/// Reads one frame, refusing bodies over the protocol limit before allocating them.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Frame, String> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = Frame::check_len(u16::from_be_bytes(len)).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    Frame::decode(&body).map_err(|e| e.to_string())
}
