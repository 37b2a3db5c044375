//! Framing: a `u16` big-endian length, then that many bytes (one Noise message).
//!
//! [`Deframer`] reassembles frames from a byte stream of any split. Between frames it holds no
//! bytes, so an idle connection keeps no receive buffer; a frame split across reads is copied
//! once into a buffer of exactly its size.

use thiserror::Error;

/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 2;
/// The largest frame body the `u16` length allows.
pub const FRAME_BODY_BYTES_MAX: usize = u16::MAX as usize;

/// A frame the peer announced that breaks the limits of the current stage.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length is above the limit for this stage of the connection.
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge { length: usize, limit: usize },
    /// The announced length is below the smallest valid message for this stage.
    #[error("frame of {length} bytes is shorter than the minimum of {minimum} bytes")]
    TooShort { length: usize, minimum: usize },
}

/// Bounds on the frame bodies accepted at one stage of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    pub body_bytes_min: usize,
    pub body_bytes_max: usize,
}

/// Reassembles frames from a stream. Feed bytes with [`Deframer::handle_input`]; each whole
/// frame body is passed to the callback in stream order.
#[derive(Debug, Default)]
pub struct Deframer {
    /// Bytes of one incomplete frame, header included. Empty between frames.
    partial: Vec<u8>,
}

impl Deframer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A deframer holding `partial`, the bytes of one incomplete frame that another
    /// deframer had buffered ([`Deframer::take_partial`]); the next input continues it.
    pub fn resume(partial: Vec<u8>) -> Self {
        Self { partial }
    }

    /// The bytes of the incomplete frame buffered here.
    pub fn partial(&self) -> &[u8] {
        &self.partial
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty()
    }

    /// Feeds `input`. Calls `on_frame` for each complete frame body, in order, and stops at
    /// the first error (from the limits or from the callback). `limits` is asked before every
    /// frame, so a callback that moves the connection to another stage changes the limits of
    /// the frames after it.
    pub fn handle_input<E: From<FrameError>>(
        &mut self,
        mut input: &[u8],
        limits: &mut dyn FnMut() -> FrameLimits,
        on_frame: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if !self.partial.is_empty() {
            if self.partial.len() < FRAME_HEADER_BYTES {
                let take = (FRAME_HEADER_BYTES - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < FRAME_HEADER_BYTES {
                    return Ok(());
                }
                let body_bytes = body_length(&self.partial);
                check(body_bytes, limits())?;
                self.partial.reserve_exact(body_bytes);
            }
            let frame_bytes = FRAME_HEADER_BYTES + body_length(&self.partial);
            let take = (frame_bytes - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() < frame_bytes {
                return Ok(());
            }
            let frame = std::mem::take(&mut self.partial);
            on_frame(&frame[FRAME_HEADER_BYTES..])?;
        }
        while input.len() >= FRAME_HEADER_BYTES {
            let body_bytes = body_length(input);
            check(body_bytes, limits())?;
            let frame_bytes = FRAME_HEADER_BYTES + body_bytes;
            if input.len() < frame_bytes {
                break;
            }
            on_frame(&input[FRAME_HEADER_BYTES..frame_bytes])?;
            input = &input[frame_bytes..];
        }
        if !input.is_empty() {
            debug_assert!(self.partial.is_empty());
            if input.len() >= FRAME_HEADER_BYTES {
                self.partial
                    .reserve_exact(FRAME_HEADER_BYTES + body_length(input));
            }
            self.partial.extend_from_slice(input);
        }
        Ok(())
    }
}

/// Appends the length prefix for a body of `body_bytes` bytes.
pub fn push_header(out: &mut Vec<u8>, body_bytes: usize) {
    assert!(body_bytes <= FRAME_BODY_BYTES_MAX, "frame body too large");
    out.extend_from_slice(&(body_bytes as u16).to_be_bytes());
}

fn body_length(bytes: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([bytes[0], bytes[1]]))
}

fn check(body_bytes: usize, limits: FrameLimits) -> Result<(), FrameError> {
    if body_bytes > limits.body_bytes_max {
        return Err(FrameError::TooLarge {
            length: body_bytes,
            limit: limits.body_bytes_max,
        });
    }
    if body_bytes < limits.body_bytes_min {
        return Err(FrameError::TooShort {
            length: body_bytes,
            minimum: limits.body_bytes_min,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY: FrameLimits = FrameLimits {
        body_bytes_min: 0,
        body_bytes_max: FRAME_BODY_BYTES_MAX,
    };

    fn framed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for body in bodies {
            push_header(&mut out, body.len());
            out.extend_from_slice(body);
        }
        out
    }

    fn feed(
        deframer: &mut Deframer,
        input: &[u8],
        seen: &mut Vec<Vec<u8>>,
    ) -> Result<(), FrameError> {
        deframer.handle_input::<FrameError>(input, &mut || ANY, &mut |frame| {
            seen.push(frame.to_vec());
            Ok(())
        })
    }

    #[test]
    fn several_frames_in_one_read() {
        let bodies: [&[u8]; 3] = [b"one", b"", b"three"];
        let mut deframer = Deframer::new();
        let mut seen = Vec::new();
        feed(&mut deframer, &framed(&bodies), &mut seen).unwrap();
        assert_eq!(seen, bodies.iter().map(|b| b.to_vec()).collect::<Vec<_>>());
        assert!(deframer.is_idle());
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let bodies: [&[u8]; 3] = [b"alpha", &[7u8; 300], b"z"];
        let stream = framed(&bodies);
        for split in 0..=stream.len() {
            for second_split in split..=stream.len() {
                let mut deframer = Deframer::new();
                let mut seen = Vec::new();
                feed(&mut deframer, &stream[..split], &mut seen).unwrap();
                feed(&mut deframer, &stream[split..second_split], &mut seen).unwrap();
                feed(&mut deframer, &stream[second_split..], &mut seen).unwrap();
                assert_eq!(seen.len(), 3, "split at {split}/{second_split}");
                assert_eq!(seen[1], vec![7u8; 300]);
                assert!(deframer.is_idle());
            }
        }
    }

    #[test]
    fn byte_at_a_time() {
        let stream = framed(&[b"hello", b"world"]);
        let mut deframer = Deframer::new();
        let mut seen = Vec::new();
        for byte in &stream {
            feed(&mut deframer, std::slice::from_ref(byte), &mut seen).unwrap();
        }
        assert_eq!(seen, vec![b"hello".to_vec(), b"world".to_vec()]);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header_alone() {
        let limits = FrameLimits {
            body_bytes_min: 1,
            body_bytes_max: 10,
        };
        for split in 0..2 {
            let mut deframer = Deframer::new();
            let input = [0x47, 0x45, 0x54, 0x20]; // "GET " read as a length
            let mut result = Ok(());
            for part in [&input[..split], &input[split..]] {
                result = deframer.handle_input::<FrameError>(part, &mut || limits, &mut |_| Ok(()));
                if result.is_err() {
                    break;
                }
            }
            assert_eq!(
                result,
                Err(FrameError::TooLarge {
                    length: 0x4745,
                    limit: 10
                })
            );
        }
    }

    #[test]
    fn short_frame_is_refused() {
        let limits = FrameLimits {
            body_bytes_min: 16,
            body_bytes_max: 100,
        };
        let mut deframer = Deframer::new();
        let result =
            deframer
                .handle_input::<FrameError>(&framed(&[b"tiny"]), &mut || limits, &mut |_| Ok(()));
        assert_eq!(
            result,
            Err(FrameError::TooShort {
                length: 4,
                minimum: 16
            })
        );
    }

    #[test]
    fn partial_frame_buffer_is_released_after_use() {
        let stream = framed(&[&[1u8; 1000]]);
        let mut deframer = Deframer::new();
        let mut seen = Vec::new();
        feed(&mut deframer, &stream[..500], &mut seen).unwrap();
        assert!(!deframer.is_idle());
        feed(&mut deframer, &stream[500..], &mut seen).unwrap();
        assert!(deframer.is_idle());
        assert_eq!(deframer.partial.capacity(), 0);
    }
}
