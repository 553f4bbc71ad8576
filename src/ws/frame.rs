//! RFC 6455 frame headers: the 2–14 byte prefix of every frame, parsed on its own so
//! that a frame's declared length is checked before a single payload byte is
//! buffered, and written for the server's (unmasked) frames.

use bytes::{BufMut as _, Bytes, BytesMut};

/// Longest frame header: 2 bytes, an 8-byte extended length and a 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Longest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The opcode of the 4-bit value, `None` for the reserved ones.
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// The 4-bit value.
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong: never fragmented, at most 125 bytes.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// The three RSV bits (`0` unless an extension was negotiated; none is).
    pub rsv: u8,
    /// The raw opcode bits (reserved values are kept so the caller can refuse them).
    pub opcode_bits: u8,
    /// The masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// The declared payload length.
    pub payload_len: u64,
    /// Bytes the header took.
    pub header_len: usize,
}

/// What the start of a buffer says about the next frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderParse {
    /// The whole header is there.
    Complete(FrameHeader),
    /// The length is known (and can be checked) but the rest of the header is not
    /// there yet.
    LengthKnown { payload_len: u64 },
    /// Not even the length is there yet.
    Incomplete,
}

/// Parses the frame header at the start of `buf` without consuming anything.
pub fn parse_header(buf: &[u8]) -> HeaderParse {
    if buf.len() < 2 {
        return HeaderParse::Incomplete;
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return HeaderParse::Incomplete;
            };
            (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return HeaderParse::Incomplete;
            };
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(ext);
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let Some(key) = buf.get(pos..pos + 4) else {
            return HeaderParse::LengthKnown { payload_len };
        };
        pos += 4;
        Some([key[0], key[1], key[2], key[3]])
    } else {
        None
    };
    HeaderParse::Complete(FrameHeader {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x07,
        opcode_bits: b0 & 0x0F,
        mask,
        payload_len,
        header_len: pos,
    })
}

/// XORs `data` with the masking key, starting at key offset 0.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

/// A server frame header (FIN set, unmasked) for a payload of `len` bytes.
pub fn server_header(opcode: OpCode, len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(10);
    out.put_u8(0x80 | opcode.bits());
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.freeze()
}

/// The payload of a close frame: the code and a reason cut to fit a control frame
/// (at a character boundary).
pub fn close_payload(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = BytesMut::with_capacity(2 + end);
    out.put_u16(code);
    out.put_slice(&reason.as_bytes()[..end]);
    out.freeze()
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4, as the Autobahn
/// suite checks it): the defined codes that are not reserved for local use, and
/// the ranges for libraries (3000–3999) and applications (4000–4999).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_extended_lengths() {
        assert_eq!(parse_header(&[0x81]), HeaderParse::Incomplete);
        let h = match parse_header(&[0x81, 0x85, 1, 2, 3, 4]) {
            HeaderParse::Complete(h) => h,
            other => panic!("{other:?}"),
        };
        assert!(h.fin);
        assert_eq!(h.opcode_bits, 1);
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        assert_eq!(h.header_len, 6);
        assert_eq!(parse_header(&[0x82, 0xFE, 0x01]), HeaderParse::Incomplete);
        assert_eq!(
            parse_header(&[0x82, 0xFE, 0x01, 0x00]),
            HeaderParse::LengthKnown { payload_len: 256 }
        );
        // 2^40 declared: known from the first ten bytes, before any mask or payload.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(
            parse_header(&huge),
            HeaderParse::LengthKnown {
                payload_len: 1 << 40
            }
        );
    }

    #[test]
    fn server_headers_round_trip() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let header = server_header(OpCode::Binary, len);
            match parse_header(&header) {
                HeaderParse::Complete(h) => {
                    assert_eq!(h.payload_len, len as u64);
                    assert_eq!(h.header_len, header.len());
                    assert_eq!(h.mask, None);
                    assert!(h.fin);
                }
                other => panic!("{len}: {other:?}"),
            }
        }
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let payload = close_payload(4000, &"é".repeat(100));
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4999] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1012, 1015, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
    }
}
