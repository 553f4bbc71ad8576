//! The WebSocket message decoder: turns the bytes a client sent into messages,
//! enforcing RFC 6455 as it goes. A frame's declared length is compared with the
//! limit as soon as the header's length field is there, before its payload is
//! waited for, so a client can never make the server buffer more than the limit;
//! fragments are reassembled up to the same limit; text is checked to be UTF-8 as
//! fragments arrive. Every violation is a [`ProtocolError`] carrying the close
//! code to answer with.

use bytes::{Buf as _, Bytes, BytesMut};
use bytestring::ByteString;

use super::frame::{
    apply_mask, is_valid_close_code, parse_header, HeaderParse, OpCode, MAX_CONTROL_PAYLOAD,
    MAX_HEADER_LEN,
};

/// Close code: the peer broke the protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: a text message (or close reason) was not UTF-8.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code: a message was larger than the server accepts.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The client started or answered the close handshake.
    Close(Option<CloseFrame>),
}

/// The code and reason of a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: String,
}

/// A violation of the protocol, with the close code the server answers it with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct ProtocolError {
    pub code: u16,
    pub reason: String,
}

impl ProtocolError {
    fn new(code: u16, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// A data message being reassembled from its fragments.
struct Partial {
    text: bool,
    data: BytesMut,
    /// Bytes at the start of `data` known to be valid UTF-8 (text only).
    utf8_valid: usize,
}

/// Decodes client frames (which must be masked) into [`Message`]s.
pub struct Decoder {
    max_message: usize,
    partial: Option<Partial>,
}

impl Decoder {
    /// A decoder refusing messages (the sum of their fragments) over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: None,
        }
    }

    /// How many bytes `buf` must hold before [`Decoder::decode`] can make progress:
    /// the whole frame in flight when its header is known, else a header's worth.
    pub fn needed(&self, buf: &[u8]) -> usize {
        match parse_header(buf) {
            HeaderParse::Complete(h) => {
                // Only called after `decode`, which refused lengths over the limit.
                h.header_len + usize::try_from(h.payload_len).unwrap_or(usize::MAX)
            }
            HeaderParse::LengthKnown { payload_len } => {
                MAX_HEADER_LEN + usize::try_from(payload_len).unwrap_or(usize::MAX)
            }
            HeaderParse::Incomplete => MAX_HEADER_LEN,
        }
    }

    /// Takes the next complete message off the front of `buf`: `Ok(None)` when more
    /// bytes are needed (frames consumed so far are kept). After an error the
    /// connection must be closed with the error's code.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        loop {
            let header = match parse_header(buf) {
                HeaderParse::Incomplete => {
                    if buf.len() >= 2 {
                        self.check(buf[0], buf[1], None)?;
                    }
                    return Ok(None);
                }
                HeaderParse::LengthKnown { payload_len } => {
                    self.check(buf[0], buf[1], Some(payload_len))?;
                    return Ok(None);
                }
                HeaderParse::Complete(header) => header,
            };
            let opcode = self.check(buf[0], buf[1], Some(header.payload_len))?;
            // `check` bounded the length by the limit, so it fits in memory.
            let payload_len = header.payload_len as usize;
            if buf.len() < header.header_len + payload_len {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(payload_len);
            if let Some(key) = header.mask {
                apply_mask(&mut payload, key);
            }
            if let Some(message) = self.on_frame(opcode, header.fin, payload)? {
                return Ok(Some(message));
            }
        }
    }

    /// Validates a frame from its first two bytes and (once known) its length.
    fn check(&self, b0: u8, b1: u8, payload_len: Option<u64>) -> Result<OpCode, ProtocolError> {
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(ProtocolError::new(
                CLOSE_PROTOCOL_ERROR,
                "reserved bits set without a negotiated extension",
            ));
        }
        let Some(opcode) = OpCode::from_bits(b0 & 0x0F) else {
            return Err(ProtocolError::new(
                CLOSE_PROTOCOL_ERROR,
                format!("reserved opcode {:#x}", b0 & 0x0F),
            ));
        };
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::new(
                CLOSE_PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::new(
                    CLOSE_PROTOCOL_ERROR,
                    "control frames cannot be fragmented",
                ));
            }
            if payload_len.is_some_and(|len| len > MAX_CONTROL_PAYLOAD as u64) {
                return Err(ProtocolError::new(
                    CLOSE_PROTOCOL_ERROR,
                    "control frame payload longer than 125 bytes",
                ));
            }
            return Ok(opcode);
        }
        match (opcode, &self.partial) {
            (OpCode::Continuation, None) => {
                return Err(ProtocolError::new(
                    CLOSE_PROTOCOL_ERROR,
                    "continuation frame without a message to continue",
                ))
            }
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::new(
                    CLOSE_PROTOCOL_ERROR,
                    "new message before the fragmented one finished",
                ))
            }
            _ => {}
        }
        if let Some(len) = payload_len {
            let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
            if so_far.saturating_add(len) > self.max_message as u64 {
                return Err(ProtocolError::new(
                    CLOSE_TOO_BIG,
                    format!("message larger than {} bytes", self.max_message),
                ));
            }
        }
        Ok(opcode)
    }

    fn on_frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: BytesMut,
    ) -> Result<Option<Message>, ProtocolError> {
        match opcode {
            OpCode::Ping => Ok(Some(Message::Ping(payload.freeze()))),
            OpCode::Pong => Ok(Some(Message::Pong(payload.freeze()))),
            OpCode::Close => close_frame(&payload).map(|frame| Some(Message::Close(frame))),
            OpCode::Text | OpCode::Binary if fin => {
                if opcode == OpCode::Binary {
                    return Ok(Some(Message::Binary(payload.freeze())));
                }
                ByteString::try_from(payload.freeze())
                    .map(|text| Some(Message::Text(text)))
                    .map_err(|_| invalid_utf8())
            }
            OpCode::Text | OpCode::Binary => {
                let mut partial = Partial {
                    text: opcode == OpCode::Text,
                    data: payload,
                    utf8_valid: 0,
                };
                check_utf8_prefix(&mut partial)?;
                self.partial = Some(partial);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut partial) = self.partial.take() else {
                    // `check` refused continuations without a message.
                    return Err(ProtocolError::new(
                        CLOSE_PROTOCOL_ERROR,
                        "continuation frame without a message to continue",
                    ));
                };
                partial.data.extend_from_slice(&payload);
                check_utf8_prefix(&mut partial)?;
                if !fin {
                    self.partial = Some(partial);
                    return Ok(None);
                }
                let data = partial.data.freeze();
                if !partial.text {
                    return Ok(Some(Message::Binary(data)));
                }
                ByteString::try_from(data)
                    .map(|text| Some(Message::Text(text)))
                    .map_err(|_| invalid_utf8())
            }
        }
    }
}

fn invalid_utf8() -> ProtocolError {
    ProtocolError::new(CLOSE_INVALID_PAYLOAD, "text message is not valid UTF-8")
}

/// Fails as soon as the text reassembled so far cannot be the start of valid
/// UTF-8; a character cut at the end of a fragment is fine.
fn check_utf8_prefix(partial: &mut Partial) -> Result<(), ProtocolError> {
    if !partial.text {
        return Ok(());
    }
    match std::str::from_utf8(&partial.data[partial.utf8_valid..]) {
        Ok(_) => partial.utf8_valid = partial.data.len(),
        Err(e) if e.error_len().is_none() => partial.utf8_valid += e.valid_up_to(),
        Err(_) => return Err(invalid_utf8()),
    }
    Ok(())
}

fn close_frame(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::new(
            CLOSE_PROTOCOL_ERROR,
            "close frame with a one-byte payload",
        )),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(ProtocolError::new(
                    CLOSE_PROTOCOL_ERROR,
                    format!("invalid close code {code}"),
                ));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| {
                ProtocolError::new(CLOSE_INVALID_PAYLOAD, "close reason is not valid UTF-8")
            })?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng as _, SeedableRng as _};

    use super::*;

    /// A client frame: masked with `key`, header as short as the length allows.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&key);
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, key);
        out.extend_from_slice(&masked);
        out
    }

    fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(message) = decoder.decode(&mut buf)? {
            out.push(message);
        }
        Ok(out)
    }

    fn code_of(result: Result<impl std::fmt::Debug, ProtocolError>) -> u16 {
        match result {
            Err(e) => e.code,
            Ok(v) => panic!("expected a protocol error, got {v:?}"),
        }
    }

    #[test]
    fn text_binary_and_control_frames() {
        let mut d = Decoder::new(1024);
        let mut bytes = client_frame(true, 1, "héllo".as_bytes(), [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 2, &[0, 1, 2], [9, 9, 9, 9]));
        bytes.extend(client_frame(true, 9, b"p", [5, 6, 7, 8]));
        bytes.extend(client_frame(true, 0xA, b"", [5, 6, 7, 8]));
        bytes.extend(client_frame(
            true,
            8,
            &[0x03, 0xE8, b'o', b'k'],
            [1, 1, 1, 1],
        ));
        let messages = decode_all(&mut d, &bytes).expect("valid frames");
        assert_eq!(
            messages,
            vec![
                Message::Text("héllo".into()),
                Message::Binary(Bytes::from_static(&[0, 1, 2])),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Pong(Bytes::new()),
                Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "ok".into()
                })),
            ]
        );
    }

    #[test]
    fn a_huge_declared_length_is_refused_from_the_header_alone() {
        let mut d = Decoder::new(64 * 1024);
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(code_of(d.decode(&mut buf)), CLOSE_TOO_BIG);
        // 70,000 bytes declared, nothing after the length: refused at once too.
        let mut d = Decoder::new(64 * 1024);
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&70_000u64.to_be_bytes());
        let mut buf = BytesMut::from(&header[..]);
        assert_eq!(code_of(d.decode(&mut buf)), CLOSE_TOO_BIG);
    }

    #[test]
    fn fragments_count_against_the_limit_together() {
        let mut d = Decoder::new(100);
        let mut bytes = client_frame(false, 2, &[0; 60], [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 0, &[0; 60], [1, 2, 3, 4]));
        assert_eq!(code_of(decode_all(&mut d, &bytes)), CLOSE_TOO_BIG);
    }

    #[test]
    fn protocol_violations_have_their_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // unmasked
            (vec![0x81, 0x01, b'a'], CLOSE_PROTOCOL_ERROR),
            // RSV1
            (client_frame(true, 0x41, b"a", [0; 4]), CLOSE_PROTOCOL_ERROR),
            // reserved opcodes
            (client_frame(true, 3, b"", [0; 4]), CLOSE_PROTOCOL_ERROR),
            (client_frame(true, 0xB, b"", [0; 4]), CLOSE_PROTOCOL_ERROR),
            // fragmented ping, long ping
            (client_frame(false, 9, b"", [0; 4]), CLOSE_PROTOCOL_ERROR),
            (
                client_frame(true, 9, &[0; 126], [0; 4]),
                CLOSE_PROTOCOL_ERROR,
            ),
            // continuation with nothing to continue
            (client_frame(true, 0, b"a", [0; 4]), CLOSE_PROTOCOL_ERROR),
            // bad UTF-8, bad close frames
            (
                client_frame(true, 1, &[0xC0, 0x80], [0; 4]),
                CLOSE_INVALID_PAYLOAD,
            ),
            (client_frame(true, 8, &[0x03], [0; 4]), CLOSE_PROTOCOL_ERROR),
            (
                client_frame(true, 8, &[0x03, 0xED], [0; 4]),
                CLOSE_PROTOCOL_ERROR,
            ),
            (
                client_frame(true, 8, &[0x03, 0xE8, 0xFF], [0; 4]),
                CLOSE_INVALID_PAYLOAD,
            ),
        ];
        for (bytes, code) in cases {
            let mut d = Decoder::new(1024);
            assert_eq!(code_of(decode_all(&mut d, &bytes)), code, "{bytes:x?}");
        }
        // A new message while a fragmented one is open.
        let mut d = Decoder::new(1024);
        let mut bytes = client_frame(false, 1, b"a", [0; 4]);
        bytes.extend(client_frame(true, 1, b"b", [0; 4]));
        assert_eq!(code_of(decode_all(&mut d, &bytes)), CLOSE_PROTOCOL_ERROR);
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_makes_it_invalid() {
        let mut d = Decoder::new(1024);
        // "é" split across fragments is fine...
        let mut bytes = client_frame(false, 1, &[b'a', 0xC3], [0; 4]);
        bytes.extend(client_frame(false, 0, &[0xA9], [0; 4]));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        // ...a byte that cannot continue it fails before the message ends.
        let mut buf = BytesMut::from(&client_frame(false, 0, &[0xFF], [0; 4])[..]);
        assert_eq!(code_of(d.decode(&mut buf)), CLOSE_INVALID_PAYLOAD);
    }

    #[test]
    fn control_frames_may_come_between_fragments() {
        let mut d = Decoder::new(1024);
        let mut bytes = client_frame(false, 1, b"ab", [1, 2, 3, 4]);
        bytes.extend(client_frame(true, 9, b"x", [1, 2, 3, 4]));
        bytes.extend(client_frame(true, 0, b"cd", [4, 3, 2, 1]));
        let messages = decode_all(&mut d, &bytes).expect("valid");
        assert_eq!(
            messages,
            vec![
                Message::Ping(Bytes::from_static(b"x")),
                Message::Text("abcd".into())
            ]
        );
    }

    /// Property: any sequence of valid messages, fragmented and masked at random
    /// and delivered in random chunks, decodes to exactly those messages, and the
    /// buffer never has to hold more than one frame plus one read.
    #[test]
    fn random_fragmentation_and_chunking_decode_to_the_same_messages() {
        let mut rng = StdRng::seed_from_u64(0x5eed_f00d);
        for _ in 0..300 {
            let limit = rng.gen_range(1..4096);
            let mut expected = Vec::new();
            let mut wire = Vec::new();
            for _ in 0..rng.gen_range(1..8) {
                let len = rng.gen_range(0..=limit);
                let text = rng.gen_bool(0.5);
                let payload: Vec<u8> = if text {
                    let s: String = (0..len)
                        .map(|_| {
                            let c = rng.gen_range(0x20u32..0x3000);
                            char::from_u32(c).unwrap_or('x')
                        })
                        .collect();
                    let mut end = s.len().min(limit);
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    s.as_bytes()[..end].to_vec()
                } else {
                    (0..len).map(|_| rng.gen()).collect()
                };
                // Split into fragments, with pings between some of them.
                let mut rest = &payload[..];
                let mut first = true;
                loop {
                    let take = if rest.is_empty() {
                        0
                    } else {
                        rng.gen_range(0..=rest.len())
                    };
                    let (chunk, tail) = rest.split_at(take);
                    let fin = tail.is_empty() && (take > 0 || rng.gen_bool(0.7));
                    let opcode = if !first {
                        0
                    } else if text {
                        1
                    } else {
                        2
                    };
                    wire.extend(client_frame(fin, opcode, chunk, rng.gen()));
                    first = false;
                    rest = tail;
                    if fin {
                        break;
                    }
                    if rng.gen_bool(0.2) {
                        wire.extend(client_frame(true, 9, b"hb", rng.gen()));
                        expected.push(Message::Ping(Bytes::from_static(b"hb")));
                    }
                }
                expected.push(if text {
                    Message::Text(
                        ByteString::try_from(Bytes::from(payload)).expect("generated UTF-8"),
                    )
                } else {
                    Message::Binary(Bytes::from(payload))
                });
            }
            let mut d = Decoder::new(limit);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < wire.len() {
                let n = rng.gen_range(1..=64).min(wire.len() - pos);
                buf.extend_from_slice(&wire[pos..pos + n]);
                pos += n;
                while let Some(m) = d.decode(&mut buf).expect("valid stream") {
                    got.push(m);
                }
                assert!(buf.len() <= d.needed(&buf).max(64), "buffered too much");
            }
            assert!(buf.is_empty());
            assert_eq!(got, expected);
        }
    }

    /// Property: random bytes never panic the decoder, and whatever it refuses, it
    /// refuses with one of the three close codes.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..2000 {
            let len = rng.gen_range(0..200);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let mut d = Decoder::new(rng.gen_range(0..300));
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match d.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => {
                        assert!(
                            matches!(
                                e.code,
                                CLOSE_PROTOCOL_ERROR | CLOSE_INVALID_PAYLOAD | CLOSE_TOO_BIG
                            ),
                            "{e:?}"
                        );
                        break;
                    }
                }
            }
        }
    }
}
