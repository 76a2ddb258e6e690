//! The two protobuf messages of libp2p's browser-to-browser WebRTC (libp2p/specs
//! `webrtc/webrtc.md` and `webrtc/README.md`), each sent with an unsigned-varint length prefix:
//!
//! - on the `/webrtc-signaling/0.0.1` stream: `Message { optional Type type = 1; optional
//!   string data = 2; }` with `SDP_OFFER = 0`, `SDP_ANSWER = 1`, `ICE_CANDIDATE = 2`;
//! - on every data channel: `Message { optional Flag flag = 1; optional bytes message = 2; }`
//!   with `FIN = 0`, `STOP_SENDING = 1`, `RESET_STREAM = 2`, `FIN_ACK = 3`.
//!
//! Two fields each do not justify a protobuf code generator; the encoding is written out here
//! and tested against bytes that js-libp2p's `protons` encoder produces.

use std::fmt;

/// A data-channel message may be at most this long, length prefix included (the spec's 16 KiB).
pub const MAX_FRAME: usize = 16 * 1024;

/// The most payload one data-channel frame carries: 16 KiB less the length prefix (2 bytes),
/// the flag field (2 bytes) and the message field's tag and length (1 + 2 bytes), as js-libp2p
/// computes it.
pub const MAX_PAYLOAD: usize = MAX_FRAME - 7;

/// The most a signaling message may carry: an SDP with many candidates fits easily.
pub const MAX_SIGNALING: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalType {
    SdpOffer,
    SdpAnswer,
    IceCandidate,
}

/// One message of the signaling stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub kind: Option<SignalType>,
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Fin,
    StopSending,
    ResetStream,
    FinAck,
}

/// One message of a data channel: a flag, payload bytes, or both (an empty message is legal).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub flag: Option<Flag>,
    pub message: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    TooLong(usize),
    VarintOverflow,
    UnknownFlag(u64),
    UnknownType(u64),
    WireType(u8),
    NotUtf8,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => write!(f, "truncated protobuf"),
            Self::TooLong(n) => write!(f, "a {n}-byte message is over the limit"),
            Self::VarintOverflow => write!(f, "a varint longer than 64 bits"),
            Self::UnknownFlag(v) => write!(f, "unknown data-channel flag {v}"),
            Self::UnknownType(v) => write!(f, "unknown signaling message type {v}"),
            Self::WireType(t) => write!(f, "unsupported protobuf wire type {t}"),
            Self::NotUtf8 => write!(f, "signaling data is not UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint at the start of `bytes` and its length, `Ok(None)` when more bytes are needed.
pub fn get_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, DecodeError> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        if i == 10 || (i == 9 && b > 1) {
            return Err(DecodeError::VarintOverflow);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Ok(None)
}

/// Splits one length-prefixed message off the front of `buffer`: `Ok(None)` until it is all
/// there; an error when its announced length is over `limit`.
pub fn take_prefixed(buffer: &mut Vec<u8>, limit: usize) -> Result<Option<Vec<u8>>, DecodeError> {
    let Some((len, header)) = get_varint(buffer)? else {
        if buffer.len() >= 10 {
            return Err(DecodeError::VarintOverflow);
        }
        return Ok(None);
    };
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > limit {
        return Err(DecodeError::TooLong(len));
    }
    if buffer.len() < header + len {
        return Ok(None);
    }
    let body = buffer[header..header + len].to_vec();
    buffer.drain(..header + len);
    Ok(Some(body))
}

fn prefixed(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 3);
    put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(&body);
    out
}

/// Field 1 as a varint, field 2 as length-delimited bytes: all both messages have. Unknown
/// fields are skipped, as protobuf requires.
fn encode_fields(one: Option<u64>, two: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(two.map_or(0, <[u8]>::len) + 6);
    if let Some(v) = one {
        out.push(0x08);
        put_varint(&mut out, v);
    }
    if let Some(bytes) = two {
        out.push(0x12);
        put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    out
}

fn decode_fields(mut bytes: &[u8]) -> Result<(Option<u64>, Option<&[u8]>), DecodeError> {
    let (mut one, mut two) = (None, None);
    while !bytes.is_empty() {
        let (key, n) = get_varint(bytes)?.ok_or(DecodeError::Truncated)?;
        bytes = &bytes[n..];
        let (field, wire) = (key >> 3, (key & 7) as u8);
        match wire {
            0 => {
                let (v, n) = get_varint(bytes)?.ok_or(DecodeError::Truncated)?;
                bytes = &bytes[n..];
                if field == 1 {
                    one = Some(v);
                }
            }
            2 => {
                let (len, n) = get_varint(bytes)?.ok_or(DecodeError::Truncated)?;
                let len = usize::try_from(len).map_err(|_| DecodeError::Truncated)?;
                let rest = &bytes[n..];
                if rest.len() < len {
                    return Err(DecodeError::Truncated);
                }
                if field == 2 {
                    two = Some(&rest[..len]);
                }
                bytes = &rest[len..];
            }
            1 | 5 => {
                let width = if wire == 1 { 8 } else { 4 };
                if bytes.len() < width {
                    return Err(DecodeError::Truncated);
                }
                bytes = &bytes[width..];
            }
            other => return Err(DecodeError::WireType(other)),
        }
    }
    Ok((one, two))
}

impl Signal {
    pub fn new(kind: SignalType, data: impl Into<String>) -> Self {
        Self {
            kind: Some(kind),
            data: data.into(),
        }
    }

    /// The message with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let kind = self.kind.map(|k| match k {
            SignalType::SdpOffer => 0,
            SignalType::SdpAnswer => 1,
            SignalType::IceCandidate => 2,
        });
        prefixed(encode_fields(kind, Some(self.data.as_bytes())))
    }

    /// Decodes a message without its length prefix.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let (kind, data) = decode_fields(body)?;
        let kind = match kind {
            None => None,
            Some(0) => Some(SignalType::SdpOffer),
            Some(1) => Some(SignalType::SdpAnswer),
            Some(2) => Some(SignalType::IceCandidate),
            Some(v) => return Err(DecodeError::UnknownType(v)),
        };
        let data = std::str::from_utf8(data.unwrap_or_default())
            .map_err(|_| DecodeError::NotUtf8)?
            .to_owned();
        Ok(Self { kind, data })
    }
}

impl Frame {
    pub fn data(message: Vec<u8>) -> Self {
        Self {
            flag: None,
            message,
        }
    }

    pub fn flag(flag: Flag) -> Self {
        Self {
            flag: Some(flag),
            message: Vec::new(),
        }
    }

    /// The frame with its length prefix, as one data-channel message.
    pub fn encode(&self) -> Vec<u8> {
        let flag = self.flag.map(|f| match f {
            Flag::Fin => 0,
            Flag::StopSending => 1,
            Flag::ResetStream => 2,
            Flag::FinAck => 3,
        });
        let message = (!self.message.is_empty()).then_some(self.message.as_slice());
        prefixed(encode_fields(flag, message))
    }

    /// Decodes a frame without its length prefix.
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let (flag, message) = decode_fields(body)?;
        let flag = match flag {
            None => None,
            Some(0) => Some(Flag::Fin),
            Some(1) => Some(Flag::StopSending),
            Some(2) => Some(Flag::ResetStream),
            Some(3) => Some(Flag::FinAck),
            Some(v) => return Err(DecodeError::UnknownFlag(v)),
        };
        Ok(Self {
            flag,
            message: message.unwrap_or_default().to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_match_the_bytes_js_libp2p_sends() {
        // protons encodes `{ flag: FIN }` as 08 00 and `{ message: [1, 2, 3] }` as 12 03 01 02 03.
        assert_eq!(Frame::flag(Flag::Fin).encode(), [2, 0x08, 0x00]);
        assert_eq!(Frame::flag(Flag::FinAck).encode(), [2, 0x08, 0x03]);
        assert_eq!(Frame::data(vec![1, 2, 3]).encode(), [5, 0x12, 3, 1, 2, 3]);
        let offer = Signal::new(SignalType::SdpOffer, "v=0").encode();
        assert_eq!(offer, [7, 0x08, 0x00, 0x12, 3, b'v', b'=', b'0']);
        for frame in [
            Frame::flag(Flag::StopSending),
            Frame::flag(Flag::ResetStream),
            Frame::data(vec![7; MAX_PAYLOAD]),
        ] {
            let mut bytes = frame.encode();
            assert!(bytes.len() <= MAX_FRAME, "{}", bytes.len());
            let body = take_prefixed(&mut bytes, MAX_FRAME).unwrap().unwrap();
            assert!(bytes.is_empty());
            assert_eq!(Frame::decode(&body).unwrap(), frame);
        }
    }

    #[test]
    fn partial_bad_and_oversized_input_is_refused_without_panicking() {
        let mut buffer = Frame::data(vec![9; 300]).encode();
        let whole = buffer.clone();
        buffer.truncate(100);
        assert_eq!(take_prefixed(&mut buffer, MAX_FRAME), Ok(None));
        buffer.extend_from_slice(&whole[100..]);
        assert!(take_prefixed(&mut buffer, MAX_FRAME).unwrap().is_some());
        let mut huge = Vec::new();
        put_varint(&mut huge, 1 << 20);
        assert_eq!(
            take_prefixed(&mut huge, MAX_FRAME),
            Err(DecodeError::TooLong(1 << 20))
        );
        assert_eq!(
            take_prefixed(&mut vec![0xff; 11], MAX_FRAME),
            Err(DecodeError::VarintOverflow)
        );
        assert_eq!(Frame::decode(&[0x08, 9]), Err(DecodeError::UnknownFlag(9)));
        assert_eq!(Frame::decode(&[0x12, 5, 1]), Err(DecodeError::Truncated));
        assert_eq!(Frame::decode(&[0x0b]), Err(DecodeError::WireType(3)));
        assert_eq!(Signal::decode(&[0x12, 1, 0xff]), Err(DecodeError::NotUtf8));
        // Unknown fields are skipped.
        assert_eq!(
            Frame::decode(&[0x18, 1, 0x08, 1]).unwrap(),
            Frame::flag(Flag::StopSending)
        );
    }
}
