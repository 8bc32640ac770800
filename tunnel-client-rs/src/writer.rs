//! The single writer of the WebSocket. It serves three queues: control frames first (they are small and
//! latency-sensitive: CONNECTED, WINDOW credit, PONG), then small DATA of otherwise idle connections (the
//! express lane: interactive traffic does not wait behind bulk windows), then bulk DATA. Frames are fed into tungstenite's write
//! buffer in batches and flushed once per batch, so a busy tunnel makes few large socket writes and an idle
//! one still sends each frame at once.

use crate::conn::Queued;
use crate::net::Ws;
use futures_util::stream::SplitSink;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error, Message};

/// Frames fed before a flush is forced (tungstenite also writes out whenever its buffer passes 256 KiB).
const MAX_BATCH: usize = 64;

pub async fn run(
    mut sink: SplitSink<Ws, Message>,
    mut ctrl: mpsc::Receiver<Message>,
    mut express: mpsc::Receiver<Queued>,
    mut data: mpsc::Receiver<Queued>,
) -> Result<(), Error> {
    loop {
        let first = tokio::select! {
            biased;
            m = ctrl.recv() => m.map(Next::Ctrl),
            q = express.recv() => q.map(Next::Data),
            q = data.recv() => q.map(Next::Data),
        };
        let Some(first) = first else { return Ok(()) };
        let mut closing = feed(&mut sink, first).await?;
        let mut batched = 1;
        while batched < MAX_BATCH && !closing {
            let next = if let Ok(m) = ctrl.try_recv() {
                Next::Ctrl(m)
            } else if let Ok(q) = express.try_recv() {
                Next::Data(q)
            } else if let Ok(q) = data.try_recv() {
                Next::Data(q)
            } else {
                break;
            };
            closing = feed(&mut sink, next).await?;
            batched += 1;
        }
        sink.flush().await?;
        if closing {
            return Ok(());
        }
    }
}

enum Next {
    Ctrl(Message),
    Data(Queued),
}

/// Feed one frame to the sink; true when it was the WebSocket close.
async fn feed(sink: &mut SplitSink<Ws, Message>, next: Next) -> Result<bool, Error> {
    match next {
        Next::Ctrl(m) => {
            let closing = matches!(m, Message::Close(_));
            sink.feed(m).await?;
            Ok(closing)
        }
        Next::Data(q) => {
            sink.feed(Message::Binary(q.frame.clone())).await?;
            q.written();
            Ok(false)
        }
    }
}
