//! The single writer of the WebSocket. It serves two queues: control frames first (they are small and
//! latency-sensitive: CONNECTED, WINDOW credit, PONG), then DATA. Frames are fed into tungstenite's write
//! buffer in batches and flushed once per batch, so a busy tunnel makes few large socket writes and an idle
//! one still sends each frame at once.

use crate::net::Ws;
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error, Message};

/// Frames fed before a flush is forced (tungstenite also writes out whenever its buffer passes 256 KiB).
const MAX_BATCH: usize = 64;

pub async fn run(
    mut sink: SplitSink<Ws, Message>,
    mut ctrl: mpsc::Receiver<Message>,
    mut data: mpsc::Receiver<Bytes>,
) -> Result<(), Error> {
    loop {
        let first = tokio::select! {
            biased;
            m = ctrl.recv() => m,
            d = data.recv() => d.map(Message::Binary),
        };
        let Some(first) = first else { return Ok(()) };
        let mut closing = matches!(first, Message::Close(_));
        sink.feed(first).await?;
        let mut batched = 1;
        while batched < MAX_BATCH && !closing {
            let next = match ctrl.try_recv() {
                Ok(m) => m,
                Err(_) => match data.try_recv() {
                    Ok(d) => Message::Binary(d),
                    Err(_) => break,
                },
            };
            closing = matches!(next, Message::Close(_));
            sink.feed(next).await?;
            batched += 1;
        }
        sink.flush().await?;
        if closing {
            return Ok(());
        }
    }
}
