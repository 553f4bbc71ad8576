//! The echo endpoint: a conformance aid, off by default (`realtime.echo_path`). It
//! runs the very codec and transport that serve `/ws` and sends every text and
//! binary message back, so the Autobahn suite (`scripts/test.sh`) checks roomcast's
//! own framing, close handshake and limits.

use futures_util::{future, StreamExt as _};

use super::{
    decoder::Message,
    transport::{ReadError, Reader, Transport, Writer},
};

/// Close code when the peer does not read its echoes.
const CLOSE_POLICY: u16 = 1008;

/// Echoes until the client closes, breaks the protocol or goes away.
pub async fn run(reader: Reader, transport: Transport, writer: Writer) {
    let echo = async move {
        let mut reader = reader;
        while let Some(item) = reader.next().await {
            let queued = match item {
                Ok(Message::Text(text)) => transport.text(text),
                Ok(Message::Binary(bytes)) => transport.binary(bytes),
                Ok(Message::Ping(payload)) => {
                    transport.pong(payload);
                    Ok(())
                }
                Ok(Message::Pong(_)) => Ok(()),
                Ok(Message::Close(frame)) => {
                    transport.close(frame.map(|f| f.code), "");
                    break;
                }
                Err(ReadError::Protocol(e)) => {
                    transport.close(Some(e.code), &e.reason);
                    break;
                }
                Err(ReadError::Lost(_)) => break,
            };
            if queued.is_err() {
                transport.close(Some(CLOSE_POLICY), "echoes are not being read");
                break;
            }
        }
        // Dropping the transport lets the writer finish.
    };
    future::join(echo, writer.run()).await;
}
