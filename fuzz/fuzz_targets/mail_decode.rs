//! `mail::decode` on one mail from another node of a cluster, of any content.
//!
//! Properties:
//! - no input panics;
//! - an input longer than `MAIL_BYTES_MAX` is refused as `TooLong`, unread;
//! - a mail that decodes, re-encoded with `mail::encode`, is at most `MAIL_BYTES_MAX` bytes
//!   and decodes to the same mail;
//! - that re-encoding is canonical: encoding the mail decoded from it gives it back.
//!
//! The input need not come back byte for byte: protobuf allows unknown fields, repeated fields
//! and long varints, and a refusal's text that is not one of the router's comes back as the
//! fixed `REJECTED_REASON_UNKNOWN`.
#![no_main]

use hop_router::mail::{self, MailError, MAIL_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let decoded = mail::decode(bytes);
    if bytes.len() > MAIL_BYTES_MAX {
        assert!(matches!(decoded, Err(MailError::TooLong { .. })));
        return;
    }
    let Ok(message) = decoded else {
        return;
    };
    let mut encoded = Vec::new();
    mail::encode(&message, &mut encoded);
    assert!(encoded.len() <= MAIL_BYTES_MAX, "{} bytes", encoded.len());
    let again = mail::decode(&encoded).expect("a mail hop encoded decodes");
    assert_eq!(
        again, message,
        "the re-encoded mail decodes to the same mail"
    );
    let mut twice = Vec::new();
    mail::encode(&again, &mut twice);
    assert_eq!(twice, encoded, "re-encoding is canonical");
});
