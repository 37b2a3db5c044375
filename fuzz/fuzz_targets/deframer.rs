//! `frame::Deframer::handle_input` against a byte stream of any content and any split.
//!
//! Properties:
//! - fed whole, in three parts (split points from the input) or a byte at a time, the deframer
//!   delivers the same frames and stops with the same error;
//! - what it delivers and the error it stops with match a plain reference parser of the stream
//!   (limits asked once per frame header, before the body is complete; limits switch stage
//!   after a number of frames, as a connection's do after its handshake; a callback error stops
//!   it at once);
//! - every frame delivered is within the limits of its stage;
//! - after success it is idle exactly when the stream ends on a frame boundary.
#![no_main]

use hop_fuzz::{split_point, DeframerCase};
use hop_protocol::frame::{Deframer, FrameError, FrameLimits, FRAME_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// Byte-at-a-time feeding is quadratic in nothing, but slow per byte; keep it to short streams.
const BYTE_AT_A_TIME_BYTES_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Frame(FrameError),
    Callback { frame_index: usize },
}

impl From<FrameError> for Stop {
    fn from(error: FrameError) -> Self {
        Self::Frame(error)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    result: Result<(), Stop>,
    /// Whether the deframer holds no partial frame; only compared after success.
    idle: bool,
}

fuzz_target!(|data: &[u8]| {
    let case = DeframerCase::parse(data);
    let stream = case.stream;
    let expected = reference(&case);

    let whole = feed(&case, &[stream]);
    assert_eq!(whole, expected, "fed whole");

    let a = split_point(case.split_a, stream.len());
    let b = a + split_point(case.split_b, stream.len() - a);
    let parts = feed(&case, &[&stream[..a], &stream[a..b], &stream[b..]]);
    assert_eq!(parts, expected, "fed in parts split at {a} and {b}");

    if stream.len() <= BYTE_AT_A_TIME_BYTES_MAX {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&case, &bytes), expected, "fed a byte at a time");
    }

    for (index, frame) in expected.frames.iter().enumerate() {
        let limits = case.limits(index);
        assert!(frame.len() >= limits.body_bytes_min && frame.len() <= limits.body_bytes_max);
    }
});

/// Feeds `chunks` in order, stopping at the first error, as a connection does.
fn feed(case: &DeframerCase<'_>, chunks: &[&[u8]]) -> Outcome {
    let mut deframer = Deframer::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut result = Ok(());
    for chunk in chunks {
        // The callbacks share the frame list: the limits depend on how many were delivered.
        let delivered = std::cell::RefCell::new(&mut frames);
        result = deframer.handle_input::<Stop>(
            chunk,
            &mut || case.limits(delivered.borrow().len()),
            &mut |frame| {
                let mut delivered = delivered.borrow_mut();
                let frame_index = delivered.len();
                delivered.push(frame.to_vec());
                match case.fail_at_frame {
                    Some(failing) if failing == frame_index => Err(Stop::Callback { frame_index }),
                    _ => Ok(()),
                }
            },
        );
        if result.is_err() {
            break;
        }
    }
    let idle = result.is_ok() && deframer.is_idle();
    Outcome {
        frames,
        result,
        idle,
    }
}

/// The stream parsed in one pass, without buffering.
fn reference(case: &DeframerCase<'_>) -> Outcome {
    let mut rest = case.stream;
    let mut frames = Vec::new();
    while rest.len() >= FRAME_HEADER_BYTES {
        let body_bytes = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if let Err(error) = check(body_bytes, case.limits(frames.len())) {
            return Outcome {
                frames,
                result: Err(Stop::Frame(error)),
                idle: false,
            };
        }
        let Some(body) = rest.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_bytes) else {
            break;
        };
        frames.push(body.to_vec());
        if case.fail_at_frame == Some(frames.len() - 1) {
            return Outcome {
                result: Err(Stop::Callback {
                    frame_index: frames.len() - 1,
                }),
                frames,
                idle: false,
            };
        }
        rest = &rest[FRAME_HEADER_BYTES + body_bytes..];
    }
    Outcome {
        frames,
        result: Ok(()),
        idle: rest.is_empty(),
    }
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
