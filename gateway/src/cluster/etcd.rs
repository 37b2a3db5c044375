//! A small blocking client for etcd's v3 JSON gateway.
//!
//! hopd registers itself in etcd under a lease and watches the member list. The `etcd-client`
//! crate would bring tokio, tonic and a system `protoc` into the build for a handful of calls,
//! so this module speaks etcd's gRPC-gateway instead: `POST /v3/...` with JSON bodies, over
//! `ureq`, one thread blocking per call.
//!
//! What the gateway does, as etcd 3.4 answers (checked against a running etcd, not the docs):
//!
//! - Keys and values travel base64-encoded; int64 fields (revisions, lease IDs, TTLs) travel
//!   as JSON strings (`"revision":"7"`), though numbers are accepted on the way in.
//! - Fields holding their default value are left out: an empty value, lease 0, `kvs` of an
//!   empty range, `succeeded` of a failed txn, the `type` of a PUT event (`0`), a keep-alive's
//!   `TTL` once the lease is gone. Every answer struct here is `#[serde(default)]`.
//! - The streaming calls (`lease/keepalive`, `watch`) wrap each answer in `{"result": ...}`;
//!   an error after the stream started arrives as `{"error": {"grpc_code", "message", ...}}`
//!   inside the 200 answer. Watch answers are separated by `\n`; the last one before the
//!   stream ends may lack it.
//! - A keep-alive of an unknown lease is not an error: it answers 200 with no `TTL`. A put or
//!   a revoke with an unknown lease answers 404 with `{"error", "message", "code": 5}`.
//! - A watch that etcd cancels (compacted past its start revision) gets a `canceled` answer
//!   but its connection stays open; the end of such a watch is ours to remember.
//! - A lease granted below etcd's minimum TTL (2 s for a default single member) gets the
//!   minimum; the granted TTL is in the answer.

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use thiserror::Error;

/// An etcd lease ID. etcd never grants 0, which means "no lease" in its answers.
pub type LeaseId = i64;

/// The largest answer body read from a unary call. etcd's own request limit is 1.5 MiB, but a
/// range answer may be larger; a member list is a few KiB.
const ANSWER_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The largest single answer on a watch stream (one batch of events).
const WATCH_ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// How much of an unexpected body an error message quotes.
const QUOTE_CHARS_MAX: usize = 200;
/// etcd's message for a lease it does not know (`rpctypes.ErrGRPCLeaseNotFound`).
const LEASE_NOT_FOUND: &str = "lease not found";

/// One key as etcd stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to; 0 for none.
    pub lease: LeaseId,
}

/// A change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed.
    Put(KeyValue),
    /// The key was deleted, by a delete or by the expiry or revocation of its lease.
    Delete { key: Vec<u8>, mod_revision: i64 },
}

/// Why a call to etcd failed. `call` names the call, as in "lease grant" or "kv range".
#[derive(Debug, Error)]
pub enum EtcdError {
    #[error("etcd: no endpoints given")]
    NoEndpoints,
    #[error("etcd: bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    /// Every endpoint failed with a transport error or an HTTP 5xx; the text is the last one.
    #[error("etcd {call}: every endpoint failed; the last: {last_error}")]
    Unreachable {
        call: &'static str,
        last_error: String,
    },
    /// An answer that is not what the gateway sends: unparseable JSON, bad base64, a missing
    /// revision, too large.
    #[error("etcd {call}: bad answer: {reason}")]
    BadAnswer { call: &'static str, reason: String },
    /// etcd does not know the lease: it expired or was revoked. Grant a new one.
    #[error("etcd: the lease is not known (it expired or was revoked)")]
    LeaseExpired,
    /// etcd refused the request (HTTP 4xx, or an error answer): not retried elsewhere.
    #[error("etcd {call}: refused with HTTP {status}, gRPC code {code}: {message}")]
    Rejected {
        call: &'static str,
        status: u16,
        code: i64,
        message: String,
    },
    /// The watch started before the oldest revision etcd keeps. Range again and watch from
    /// the range's revision + 1.
    #[error(
        "etcd watch: compacted past the start revision; the oldest kept is {compact_revision}"
    )]
    Compacted { compact_revision: i64 },
    /// etcd cancelled the watch for another reason.
    #[error("etcd watch: cancelled by etcd: {reason}")]
    WatchCancelled { reason: String },
    /// The watch stream ended or broke. Range again and watch anew.
    #[error("etcd watch: the stream ended: {reason}")]
    WatchEnded { reason: String },
}

/// A client for one etcd cluster. Every call blocks for at most the timeout given to
/// [`Etcd::new`] per endpoint tried; [`Etcd::watch_prefix`] returns a stream that is read
/// without a time limit.
///
/// Failover: a call that fails with a transport error (refused, timeout) or an HTTP 5xx is
/// tried on the next endpoint, starting from the last one that answered. A call whose answer
/// was lost may still have been applied: a retried [`Etcd::create`] may then report that the
/// key existed.
#[derive(Debug)]
pub struct Etcd {
    /// Base URLs, such as `http://10.99.0.1:2379`, without a trailing slash.
    endpoints: Vec<String>,
    agent: ureq::Agent,
    timeout: Duration,
    /// The index in `endpoints` of the last endpoint that answered: calls start there.
    answered_last: AtomicUsize,
}

impl Etcd {
    /// `endpoints` like `"http://10.99.0.1:2379"` (a bare `"host:port"` gets `"http://"`);
    /// `timeout` bounds each request, from connecting to reading the whole answer. Fails if
    /// the list is empty or an endpoint is not a plain-HTTP URL (this build has no TLS).
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|endpoint| normalise_endpoint(endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // 4xx and 5xx answers carry etcd's error in the body: read them, do not bail.
            .http_status_as_error(false)
            .max_redirects(0)
            // etcd is reached directly: an HTTP_PROXY meant for something else in hopd's
            // environment must not carry the cluster's membership.
            .proxy(None)
            .build();
        Ok(Self {
            endpoints,
            agent: ureq::Agent::new_with_config(config),
            timeout,
            answered_last: AtomicUsize::new(0),
        })
    }

    /// Grants a lease of `ttl_s` seconds. Returns its ID and the TTL etcd granted (etcd raises
    /// a TTL below its minimum to the minimum).
    pub fn grant(&self, ttl_s: i64) -> Result<(LeaseId, i64), EtcdError> {
        const CALL: &str = "lease grant";
        let answer: GrantAnswer = self.unary(
            CALL,
            "/v3/lease/grant",
            &json!({ "TTL": ttl_s.to_string() }),
        )?;
        if !answer.error.is_empty() {
            return Err(EtcdError::Rejected {
                call: CALL,
                status: 200,
                code: 0,
                message: answer.error,
            });
        }
        if answer.id == 0 || answer.ttl <= 0 {
            return Err(bad_answer(CALL, "no lease ID or TTL in the answer"));
        }
        Ok((answer.id, answer.ttl))
    }

    /// Renews `lease` once. Returns the seconds it has left, or [`EtcdError::LeaseExpired`]
    /// when etcd no longer knows it.
    pub fn keep_alive(&self, lease: LeaseId) -> Result<i64, EtcdError> {
        const CALL: &str = "lease keep-alive";
        let answer: StreamAnswer<KeepAliveAnswer> = self.unary(
            CALL,
            "/v3/lease/keepalive",
            &json!({ "ID": lease.to_string() }),
        )?;
        if let Some(error) = answer.error {
            return Err(stream_error(CALL, &error));
        }
        let result = answer
            .result
            .ok_or_else(|| bad_answer(CALL, "neither a result nor an error"))?;
        // An unknown lease is answered with a TTL of 0, which the gateway leaves out.
        if result.ttl <= 0 {
            return Err(EtcdError::LeaseExpired);
        }
        Ok(result.ttl)
    }

    /// Revokes `lease`, deleting every key attached to it.
    pub fn revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        let _: HeaderAnswer = self.unary(
            "lease revoke",
            "/v3/lease/revoke",
            &json!({ "ID": lease.to_string() }),
        )?;
        Ok(())
    }

    /// Sets `key` to `value`, attached to `lease` if given. Returns the revision of the put.
    pub fn put(&self, key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Result<i64, EtcdError> {
        const CALL: &str = "kv put";
        let answer: HeaderAnswer =
            self.unary(CALL, "/v3/kv/put", &put_request(key, value, lease))?;
        revision_of(CALL, &answer.header)
    }

    /// Creates `key` only if it does not exist (a txn comparing its create revision with 0).
    /// Ok(true) if created; Ok(false) if it existed, and then nothing changed.
    pub fn create(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, EtcdError> {
        let request = json!({
            "compare": [{
                "key": BASE64.encode(key),
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            }],
            "success": [{ "request_put": put_request(key, value, lease) }],
        });
        let answer: TxnAnswer = self.unary("kv txn (create)", "/v3/kv/txn", &request)?;
        Ok(answer.succeeded)
    }

    /// The key, if it exists.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        const CALL: &str = "kv range (get)";
        let answer: RangeAnswer =
            self.unary(CALL, "/v3/kv/range", &json!({ "key": BASE64.encode(key) }))?;
        if answer.kvs.len() > 1 {
            return Err(bad_answer(CALL, "several keys for one key"));
        }
        Ok(answer.kvs.into_iter().next().map(KeyValue::from))
    }

    /// Every key starting with `prefix`, in key order, and the store revision the answer
    /// reflects (watch from it + 1 to see every later change).
    pub fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        const CALL: &str = "kv range (prefix)";
        let request = json!({
            "key": BASE64.encode(prefix_start(prefix)),
            "range_end": BASE64.encode(prefix_range_end(prefix)),
        });
        let answer: RangeAnswer = self.unary(CALL, "/v3/kv/range", &request)?;
        let revision = revision_of(CALL, &answer.header)?;
        if answer.more {
            // Only a request with a limit is cut short; this one has none.
            return Err(bad_answer(
                CALL,
                "a partial range for a request without a limit",
            ));
        }
        Ok((
            answer.kvs.into_iter().map(KeyValue::from).collect(),
            revision,
        ))
    }

    /// Deletes `key`; deleting a key that does not exist is not an error.
    pub fn delete(&self, key: &[u8]) -> Result<(), EtcdError> {
        let _: HeaderAnswer = self.unary(
            "kv delete",
            "/v3/kv/deleterange",
            &json!({ "key": BASE64.encode(key) }),
        )?;
        Ok(())
    }

    /// A watch on every key under `prefix`, from `start_revision` (the first revision to
    /// report; typically [`Etcd::range_prefix`]'s revision + 1; 0 means from now).
    ///
    /// Connecting and the answer's headers are bounded by the timeout; the stream lasts at
    /// most `lifetime` (`None`: no limit), after which [`Watch::next_events`] fails and the
    /// caller lists and watches again. A quiet member list sends nothing for hours, and a peer
    /// that vanishes without closing the connection (a partition) would leave an unlimited
    /// watch blocked for good: TCP notices nothing on an idle connection.
    pub fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
        lifetime: Option<Duration>,
    ) -> Result<Watch, EtcdError> {
        const CALL: &str = "watch";
        let request = json!({
            "create_request": {
                "key": BASE64.encode(prefix_start(prefix)),
                "range_end": BASE64.encode(prefix_range_end(prefix)),
                "start_revision": start_revision.to_string(),
            }
        })
        .to_string();
        let (endpoint, response) = self.each_endpoint(CALL, |endpoint| {
            let response = self
                .agent
                .post(format!("{endpoint}/v3/watch"))
                .config()
                .timeout_global(lifetime)
                .timeout_connect(Some(self.timeout))
                .timeout_recv_response(Some(self.timeout))
                .build()
                .content_type("application/json")
                .send(request.as_bytes())
                .map_err(|error| transport_failure(CALL, error))?;
            let status = response.status().as_u16();
            if status == 200 {
                return Ok((endpoint.to_string(), response));
            }
            // Not a stream but etcd's error, a short body sent at once.
            let body = response
                .into_body()
                .into_with_config()
                .limit(ANSWER_BYTES_MAX)
                .read_to_vec()
                .map_err(|error| transport_failure(CALL, error))?;
            if status >= 500 {
                return Err(Attempt::TryNext(format!("HTTP {status}: {}", quote(&body))));
            }
            Err(Attempt::Fail(rejection(CALL, status, &body)))
        })?;
        let reader = response.into_body().into_with_config().reader();
        Ok(Watch {
            stream: Some(BufReader::new(reader)),
            endpoint,
            line: Vec::new(),
        })
    }

    /// Sends `request` to `path` and decodes a 2xx answer as `T`.
    fn unary<T: DeserializeOwned>(
        &self,
        call: &'static str,
        path: &str,
        request: &Value,
    ) -> Result<T, EtcdError> {
        let request = request.to_string();
        let (status, body) = self.each_endpoint(call, |endpoint| {
            let mut response = self
                .agent
                .post(format!("{endpoint}{path}"))
                .content_type("application/json")
                .send(request.as_bytes())
                .map_err(|error| transport_failure(call, error))?;
            let status = response.status().as_u16();
            // Read the whole body under the timeout: a body cut short is a transport failure
            // like a refused connection.
            let body = response
                .body_mut()
                .with_config()
                .limit(ANSWER_BYTES_MAX)
                .read_to_vec()
                .map_err(|error| transport_failure(call, error))?;
            if status >= 500 {
                return Err(Attempt::TryNext(format!("HTTP {status}: {}", quote(&body))));
            }
            Ok((status, body))
        })?;
        if !(200..300).contains(&status) {
            return Err(rejection(call, status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|error| bad_answer(call, format!("{error} in {}", quote(&body))))
    }

    /// Runs `attempt` on each endpoint in turn, from the last one that answered, until one
    /// answers or fails for good.
    fn each_endpoint<A>(
        &self,
        call: &'static str,
        mut attempt: impl FnMut(&str) -> Result<A, Attempt>,
    ) -> Result<A, EtcdError> {
        let count = self.endpoints.len();
        let first = self.answered_last.load(Ordering::Relaxed) % count;
        let mut last_error = String::new();
        for step in 0..count {
            let index = (first + step) % count;
            let endpoint = &self.endpoints[index];
            match attempt(endpoint) {
                Ok(answer) => {
                    self.answered_last.store(index, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(Attempt::Fail(error)) => {
                    self.answered_last.store(index, Ordering::Relaxed);
                    return Err(error);
                }
                Err(Attempt::TryNext(error)) => last_error = format!("{endpoint}: {error}"),
            }
        }
        Err(EtcdError::Unreachable { call, last_error })
    }
}

/// A streaming watch: one long HTTP answer of JSON objects, read as they come. Blocking.
/// Dropping it closes the connection, which cancels the watch in etcd.
pub struct Watch {
    /// None once the watch has ended, whether or not etcd closed the connection.
    stream: Option<BufReader<ureq::BodyReader<'static>>>,
    /// The endpoint the watch runs on, for error messages.
    endpoint: String,
    /// The answer being read, kept to reuse its allocation.
    line: Vec<u8>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Watch")
            .field("endpoint", &self.endpoint)
            .field("ended", &self.stream.is_none())
            .finish()
    }
}

impl Watch {
    /// The next batch of events, skipping the answer that confirms the watch and empty
    /// progress answers. Err when the stream ends or breaks (then range again and watch
    /// anew), [`EtcdError::Compacted`] if etcd compacted past the start revision. Once it has
    /// returned an error, every later call returns [`EtcdError::WatchEnded`].
    pub fn next_events(&mut self) -> Result<Vec<WatchEvent>, EtcdError> {
        loop {
            let answer = match self.next_answer() {
                Ok(Some(answer)) => answer,
                Ok(None) => continue,
                Err(error) => {
                    self.stream = None;
                    return Err(error);
                }
            };
            match events_of(answer) {
                Ok(events) if events.is_empty() => continue,
                Ok(events) => return Ok(events),
                Err(error) => {
                    self.stream = None;
                    return Err(error);
                }
            }
        }
    }

    /// Reads one answer off the stream; None for a blank line.
    fn next_answer(&mut self) -> Result<Option<StreamAnswer<WatchAnswer>>, EtcdError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(EtcdError::WatchEnded {
                reason: "the watch ended before".to_string(),
            });
        };
        self.line.clear();
        // One byte past the limit tells a line at the limit from one beyond it.
        let mut bounded = Read::by_ref(stream).take(WATCH_ANSWER_BYTES_MAX as u64 + 1);
        let read =
            bounded
                .read_until(b'\n', &mut self.line)
                .map_err(|error| EtcdError::WatchEnded {
                    reason: format!("reading from {}: {error}", self.endpoint),
                })?;
        if read == 0 {
            return Err(EtcdError::WatchEnded {
                reason: format!("{} closed the stream", self.endpoint),
            });
        }
        if self.line.len() > WATCH_ANSWER_BYTES_MAX {
            return Err(bad_answer(
                "watch",
                format!("an answer over {WATCH_ANSWER_BYTES_MAX} bytes"),
            ));
        }
        let text = self.line.trim_ascii();
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(text)
            .map(Some)
            .map_err(|error| bad_answer("watch", format!("{error} in {}", quote(text))))
    }
}

/// The events of one watch answer, or why the watch ended.
fn events_of(answer: StreamAnswer<WatchAnswer>) -> Result<Vec<WatchEvent>, EtcdError> {
    const CALL: &str = "watch";
    if let Some(error) = answer.error {
        let (code, message) = error_fields(&error);
        return Err(EtcdError::WatchEnded {
            reason: format!("etcd ended it with gRPC code {code}: {message}"),
        });
    }
    let result = answer
        .result
        .ok_or_else(|| bad_answer(CALL, "neither a result nor an error"))?;
    if result.canceled {
        if result.compact_revision > 0 {
            return Err(EtcdError::Compacted {
                compact_revision: result.compact_revision,
            });
        }
        return Err(EtcdError::WatchCancelled {
            reason: if result.cancel_reason.is_empty() {
                "no reason given".to_string()
            } else {
                result.cancel_reason
            },
        });
    }
    Ok(result
        .events
        .into_iter()
        .map(|event| match event.kind {
            EventKind::Put => WatchEvent::Put(KeyValue::from(event.kv)),
            EventKind::Delete => WatchEvent::Delete {
                key: event.kv.key,
                mod_revision: event.kv.mod_revision,
            },
        })
        .collect())
}

/// How one attempt on one endpoint failed.
enum Attempt {
    /// A transport error or an HTTP 5xx: the next endpoint may do better.
    TryNext(String),
    /// An answer from etcd, or a failure no other endpoint would change.
    Fail(EtcdError),
}

/// Sorts a ureq error: an answer over the limit is etcd's answer, anything else the transport.
fn transport_failure(call: &'static str, error: ureq::Error) -> Attempt {
    match error {
        ureq::Error::BodyExceedsLimit(limit) => {
            Attempt::Fail(bad_answer(call, format!("an answer over {limit} bytes")))
        }
        error => Attempt::TryNext(error.to_string()),
    }
}

/// The error for a non-2xx answer that etcd gave.
fn rejection(call: &'static str, status: u16, body: &[u8]) -> EtcdError {
    let (code, message) = match serde_json::from_slice::<Value>(body) {
        Ok(value) => error_fields(&value),
        // Not the gateway's JSON (a 404 for a path it does not serve is plain text).
        Err(_) => (0, quote(body)),
    };
    if message.contains(LEASE_NOT_FOUND) {
        return EtcdError::LeaseExpired;
    }
    EtcdError::Rejected {
        call,
        status,
        code,
        message,
    }
}

/// The error for an `{"error": {...}}` answer inside a 200 stream.
fn stream_error(call: &'static str, error: &Value) -> EtcdError {
    let (code, message) = error_fields(error);
    if message.contains(LEASE_NOT_FOUND) {
        return EtcdError::LeaseExpired;
    }
    EtcdError::Rejected {
        call,
        status: 200,
        code,
        message,
    }
}

/// The gRPC code and message of an error answer. A unary error is `{"error": "text",
/// "message": "text", "code": 5}`; a stream error `{"grpc_code": 14, "message": "text", ...}`.
fn error_fields(error: &Value) -> (i64, String) {
    let code = error
        .get("code")
        .or_else(|| error.get("grpc_code"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let message = error
        .get("message")
        .or_else(|| error.get("error"))
        .and_then(Value::as_str)
        .map_or_else(|| quote(error.to_string().as_bytes()), str::to_string);
    (code, message)
}

fn bad_answer(call: &'static str, reason: impl Into<String>) -> EtcdError {
    EtcdError::BadAnswer {
        call,
        reason: reason.into(),
    }
}

/// The start of `body` as text, for an error message.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut quoted: String = text.chars().take(QUOTE_CHARS_MAX).collect();
    if text.chars().count() > QUOTE_CHARS_MAX {
        quoted.push_str("...");
    }
    format!("{quoted:?}")
}

/// The revision in an answer's header; every answer that reflects the store carries one.
fn revision_of(call: &'static str, header: &Header) -> Result<i64, EtcdError> {
    if header.revision <= 0 {
        return Err(bad_answer(call, "no revision in the answer's header"));
    }
    Ok(header.revision)
}

fn put_request(key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Value {
    let mut request = json!({ "key": BASE64.encode(key), "value": BASE64.encode(value) });
    if let (Some(lease), Value::Object(fields)) = (lease, &mut request) {
        fields.insert("lease".to_string(), Value::String(lease.to_string()));
    }
    request
}

/// The first key of a prefix range. etcd refuses an empty key, so the empty prefix (every
/// key) starts at "\0", the smallest key there is.
fn prefix_start(prefix: &[u8]) -> &[u8] {
    if prefix.is_empty() {
        b"\0"
    } else {
        prefix
    }
}

/// The end (exclusive) of the range of keys starting with `prefix`: the prefix with its last
/// byte below 0xff incremented and what follows dropped. A prefix of 0xff bytes only (or none)
/// has no such key; "\0" tells etcd to range to the end of the key space.
fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Checks an endpoint and gives it a scheme if it has none.
fn normalise_endpoint(endpoint: &str) -> Result<String, EtcdError> {
    let bad = |reason: &str| EtcdError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = endpoint.trim();
    let authority = if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("https://") {
        return Err(bad(
            "https needs TLS, which this build leaves out; use http://",
        ));
    } else if trimmed.contains("://") {
        return Err(bad("the scheme must be http://"));
    } else {
        trimmed
    };
    let url = format!("http://{}", authority.trim_end_matches('/'));
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| bad("not a URL such as http://10.99.0.1:2379"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(url)
}

/// The answer header; only the revision matters here.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Header {
    #[serde(deserialize_with = "int64")]
    revision: i64,
}

/// An answer of which only the header matters (put, revoke, delete).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeaderAnswer {
    header: Header,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GrantAnswer {
    #[serde(rename = "ID", deserialize_with = "int64")]
    id: i64,
    #[serde(rename = "TTL", deserialize_with = "int64")]
    ttl: i64,
    error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeepAliveAnswer {
    #[serde(rename = "TTL", deserialize_with = "int64")]
    ttl: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TxnAnswer {
    succeeded: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RangeAnswer {
    header: Header,
    kvs: Vec<KeyValueJson>,
    more: bool,
}

/// One answer of a streaming call: a result, or an error once the stream had started.
#[derive(Debug, Deserialize)]
struct StreamAnswer<T> {
    result: Option<T>,
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WatchAnswer {
    canceled: bool,
    #[serde(deserialize_with = "int64")]
    compact_revision: i64,
    cancel_reason: String,
    events: Vec<EventJson>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EventJson {
    #[serde(rename = "type")]
    kind: EventKind,
    kv: KeyValueJson,
}

/// `mvccpb.Event.EventType`: by name as the gateway writes it, or by number.
#[derive(Debug, Default)]
enum EventKind {
    #[default]
    Put,
    Delete,
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Value::deserialize(deserializer)? {
            Value::String(name) if name == "PUT" => Ok(Self::Put),
            Value::String(name) if name == "DELETE" => Ok(Self::Delete),
            Value::Number(number) if number.as_u64() == Some(0) => Ok(Self::Put),
            Value::Number(number) if number.as_u64() == Some(1) => Ok(Self::Delete),
            other => Err(D::Error::custom(format!("unknown event type {other}"))),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeyValueJson {
    #[serde(deserialize_with = "base64_bytes")]
    key: Vec<u8>,
    #[serde(deserialize_with = "base64_bytes")]
    value: Vec<u8>,
    #[serde(deserialize_with = "int64")]
    mod_revision: i64,
    #[serde(deserialize_with = "int64")]
    lease: i64,
}

impl From<KeyValueJson> for KeyValue {
    fn from(kv: KeyValueJson) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

/// An int64 as proto3 JSON writes it (a string), or as a number.
fn int64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::String(text) => text
            .parse()
            .map_err(|_| D::Error::custom(format!("{text:?} is not an int64"))),
        Value::Number(number) => number
            .as_i64()
            .ok_or_else(|| D::Error::custom(format!("{number} is not an int64"))),
        Value::Null => Ok(0),
        other => Err(D::Error::custom(format!("{other} is not an int64"))),
    }
}

/// Bytes as proto3 JSON writes them: standard base64.
fn base64_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    BASE64
        .decode(text.as_bytes())
        .map_err(|error| D::Error::custom(format!("bad base64 {text:?}: {error}")))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// How long a test waits for etcd to start, or for a watch event.
    const WAIT: Duration = Duration::from_secs(10);
    /// The per-request timeout of the tests' clients.
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A single-member etcd on loopback ports, killed when dropped.
    struct EtcdServer {
        child: Child,
        endpoint: String,
        data: tempfile::TempDir,
    }

    impl EtcdServer {
        /// Starts etcd, or returns None (and says so) where it is not installed.
        ///
        /// Ports are free a moment before etcd binds them, so a test running beside may take
        /// one first: each etcd gets a name of its own, and a start counts only once the
        /// member answering on the port carries that name (else it starts again, new ports).
        fn start(test: &str) -> Option<Self> {
            let Some(binary) = etcd_binary() else {
                println!(
                    "SKIPPED: {test}: no etcd binary (/usr/bin/etcd or on PATH); \
                     apt-get install etcd-server"
                );
                return None;
            };
            static STARTED: AtomicUsize = AtomicUsize::new(0);
            for _ in 0..5 {
                let name = format!(
                    "hop-test-{}-{}",
                    std::process::id(),
                    STARTED.fetch_add(1, Ordering::Relaxed)
                );
                let data = tempfile::tempdir().expect("a temporary folder");
                let [client_port, peer_port] = free_ports();
                let endpoint = format!("http://127.0.0.1:{client_port}");
                let peer = format!("http://127.0.0.1:{peer_port}");
                let log = std::fs::File::create(data.path().join("etcd.log")).expect("a log file");
                let child = Command::new(&binary)
                    .arg(format!("--name={name}"))
                    .arg(format!("--initial-cluster-token={name}"))
                    .arg(format!("--data-dir={}", data.path().join("etcd").display()))
                    .arg(format!("--listen-client-urls={endpoint}"))
                    .arg(format!("--advertise-client-urls={endpoint}"))
                    .arg(format!("--listen-peer-urls={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster={name}={peer}"))
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("a log file"))
                    .stderr(log)
                    .spawn()
                    .expect("etcd starts");
                let mut server = Self {
                    child,
                    endpoint,
                    data,
                };
                if server.wait_healthy(&name) {
                    return Some(server);
                }
            }
            panic!("{test}: etcd lost its ports to other processes five times");
        }

        /// Waits until this etcd answers healthy on its own port (true), or has exited (false).
        fn wait_healthy(&mut self, name: &str) -> bool {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(1)))
                .build()
                .into();
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if self.child.try_wait().expect("etcd's status").is_some() {
                    return false;
                }
                let ours = agent
                    .post(format!("{}/v3/cluster/member/list", self.endpoint))
                    .send("{}")
                    .ok()
                    .and_then(|mut response| response.body_mut().read_to_string().ok())
                    .is_some_and(|body| body.contains(&format!(r#""name":"{name}""#)));
                let healthy = ours
                    && agent
                        .get(format!("{}/health", self.endpoint))
                        .call()
                        .ok()
                        .and_then(|mut response| response.body_mut().read_to_string().ok())
                        .is_some_and(|body| body.contains(r#""health":"true""#));
                if healthy {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let log = std::fs::read_to_string(self.data.path().join("etcd.log"));
            panic!("etcd did not become healthy within {WAIT:?}; its log: {log:?}");
        }

        fn client(&self) -> Etcd {
            Etcd::new(std::slice::from_ref(&self.endpoint), TIMEOUT).expect("a client")
        }

        /// Compacts the store up to `revision` (not part of the client's API).
        fn compact(&self, revision: i64) {
            let body = json!({ "revision": revision.to_string(), "physical": true }).to_string();
            let response = ureq::post(format!("{}/v3/kv/compaction", self.endpoint))
                .send(body.as_bytes())
                .expect("compaction answers");
            assert_eq!(response.status().as_u16(), 200);
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn etcd_binary() -> Option<PathBuf> {
        let installed = PathBuf::from("/usr/bin/etcd");
        if installed.is_file() {
            return Some(installed);
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|folder| folder.join("etcd"))
            .find(|candidate| candidate.is_file())
    }

    /// Loopback ports free a moment ago.
    fn free_ports<const N: usize>() -> [u16; N] {
        let listeners: Vec<TcpListener> = (0..N)
            .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        std::array::from_fn(|index| listeners[index].local_addr().expect("an address").port())
    }

    /// An endpoint where nothing listens: connecting is refused.
    fn dead_endpoint() -> String {
        let [port] = free_ports();
        format!("http://127.0.0.1:{port}")
    }

    /// An endpoint that answers every request with `status` (such as "503 Service
    /// Unavailable") and the JSON `body`.
    fn canned_endpoint(status: &str, body: &str) -> String {
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let endpoint = format!("http://{}", listener.local_addr().expect("an address"));
        std::thread::spawn(move || {
            for mut connection in listener.incoming().flatten() {
                read_request(&mut connection);
                let _ = connection.write_all(answer.as_bytes());
            }
        });
        endpoint
    }

    /// Reads one request's head and body (the body's length from Content-Length).
    fn read_request(connection: &mut TcpStream) {
        let mut reader = BufReader::new(connection);
        let mut body_bytes = 0;
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
            let lower = line.to_ascii_lowercase();
            if let Some(length) = lower.strip_prefix("content-length:") {
                body_bytes = length.trim().parse().unwrap_or(0);
            }
            line.clear();
        }
        let mut body = vec![0; body_bytes];
        let _ = reader.read_exact(&mut body);
    }

    /// Reads watch events on a thread of their own until `count` have arrived, so that a
    /// missing event fails the test instead of hanging it.
    fn collect_events(mut watch: Watch, count: usize) -> Vec<WatchEvent> {
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || loop {
            let batch = watch.next_events();
            let failed = batch.is_err();
            if sender.send(batch).is_err() || failed {
                return;
            }
        });
        let mut events = Vec::new();
        let deadline = Instant::now() + WAIT;
        while events.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(Ok(batch)) => events.extend(batch),
                Ok(Err(error)) => panic!("the watch failed after {events:?}: {error}"),
                Err(_) => panic!("only {events:?} within {WAIT:?}, wanted {count} events"),
            }
        }
        events
    }

    #[test]
    fn the_cluster_secret_is_made_once_and_read_alike_by_every_node() {
        use crate::cluster::membership::{cluster_secret, SECRET_KEY};
        let Some(server) = EtcdServer::start("the_cluster_secret_is_made_once") else {
            return;
        };
        let endpoints = [server.endpoint.clone()];
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let endpoints = endpoints.clone();
                std::thread::spawn(move || cluster_secret(&endpoints, 2_000, WAIT))
            })
            .collect();
        let secrets: Vec<[u8; 32]> = threads
            .into_iter()
            .map(|thread| thread.join().unwrap().expect("a secret"))
            .collect();
        assert!(
            secrets.iter().all(|secret| *secret == secrets[0]),
            "one secret"
        );
        assert_ne!(secrets[0], [0; 32]);
        let kept = server.client().get(SECRET_KEY.as_bytes()).unwrap().unwrap();
        assert_eq!(kept.value, hex::encode(secrets[0]).into_bytes());

        server
            .client()
            .put(SECRET_KEY.as_bytes(), b"not hex", None)
            .unwrap();
        let error = cluster_secret(&endpoints, 2_000, Duration::ZERO).unwrap_err();
        assert!(error.contains("not 64 hex digits"), "{error}");
        let unreachable = ["http://127.0.0.1:1".to_string()];
        let error = cluster_secret(&unreachable, 2_000, Duration::ZERO).unwrap_err();
        assert!(
            error.contains("cannot read the cluster's secret"),
            "{error}"
        );
    }

    #[test]
    fn lease_put_get_keep_alive_revoke() {
        let Some(server) = EtcdServer::start("lease_put_get_keep_alive_revoke") else {
            return;
        };
        let etcd = server.client();
        let (lease, ttl_s) = etcd.grant(30).expect("grant");
        assert_ne!(lease, 0);
        assert_eq!(ttl_s, 30);

        let revision = etcd
            .put(b"/hop/members/a", b"10.99.0.1:5222", Some(lease))
            .expect("put");
        assert!(revision > 1);
        let kv = etcd.get(b"/hop/members/a").expect("get").expect("the key");
        assert_eq!(
            kv,
            KeyValue {
                key: b"/hop/members/a".to_vec(),
                value: b"10.99.0.1:5222".to_vec(),
                mod_revision: revision,
                lease,
            }
        );
        assert_eq!(etcd.get(b"/hop/members/nobody").expect("get"), None);

        let left_s = etcd.keep_alive(lease).expect("keep-alive");
        assert!((1..=30).contains(&left_s), "{left_s} s left");

        etcd.revoke(lease).expect("revoke");
        assert_eq!(etcd.get(b"/hop/members/a").expect("get"), None);
    }

    #[test]
    fn put_without_lease_and_empty_value_then_delete() {
        let Some(server) = EtcdServer::start("put_without_lease_and_empty_value_then_delete")
        else {
            return;
        };
        let etcd = server.client();
        // An empty value and lease 0 are left out of the gateway's answer.
        let revision = etcd.put(b"/hop/empty", b"", None).expect("put");
        let kv = etcd.get(b"/hop/empty").expect("get").expect("the key");
        assert_eq!(kv.value, b"");
        assert_eq!(kv.lease, 0);
        assert_eq!(kv.mod_revision, revision);
        etcd.delete(b"/hop/empty").expect("delete");
        assert_eq!(etcd.get(b"/hop/empty").expect("get"), None);
        etcd.delete(b"/hop/empty").expect("deleting a missing key");
    }

    #[test]
    fn keep_alive_of_revoked_lease_is_lease_expired() {
        let Some(server) = EtcdServer::start("keep_alive_of_revoked_lease_is_lease_expired") else {
            return;
        };
        let etcd = server.client();
        let (lease, _) = etcd.grant(30).expect("grant");
        etcd.revoke(lease).expect("revoke");
        assert!(matches!(
            etcd.keep_alive(lease),
            Err(EtcdError::LeaseExpired)
        ));
        assert!(matches!(
            etcd.put(b"/hop/k", b"v", Some(lease)),
            Err(EtcdError::LeaseExpired)
        ));
        assert!(matches!(
            etcd.create(b"/hop/k", b"v", Some(lease)),
            Err(EtcdError::LeaseExpired)
        ));
        assert!(matches!(etcd.revoke(lease), Err(EtcdError::LeaseExpired)));
    }

    #[test]
    fn create_only_when_absent() {
        let Some(server) = EtcdServer::start("create_only_when_absent") else {
            return;
        };
        let etcd = server.client();
        let (lease, _) = etcd.grant(30).expect("grant");
        assert!(etcd
            .create(b"/hop/leader", b"node-1", Some(lease))
            .expect("create"));
        assert!(!etcd
            .create(b"/hop/leader", b"node-2", None)
            .expect("create"));
        let kv = etcd.get(b"/hop/leader").expect("get").expect("the key");
        assert_eq!(kv.value, b"node-1");
        assert_eq!(kv.lease, lease);
    }

    #[test]
    fn range_prefix_in_key_order_with_revision() {
        let Some(server) = EtcdServer::start("range_prefix_in_key_order_with_revision") else {
            return;
        };
        let etcd = server.client();
        for key in [
            &b"/hop/members/c"[..],
            b"/hop/members/a",
            b"/hop/members0",
            b"/hop/member",
            b"/hop/members/b",
        ] {
            etcd.put(key, key, None).expect("put");
        }
        let last = etcd.put(b"/hop/other", b"", None).expect("put");

        let (kvs, revision) = etcd.range_prefix(b"/hop/members/").expect("range");
        let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(
            keys,
            [&b"/hop/members/a"[..], b"/hop/members/b", b"/hop/members/c"]
        );
        assert!(kvs.iter().all(|kv| kv.value == kv.key));
        assert_eq!(revision, last);

        let (kvs, revision) = etcd.range_prefix(b"/hop/nothing/").expect("range");
        assert!(kvs.is_empty());
        assert_eq!(revision, last);

        let (kvs, _) = etcd.range_prefix(b"").expect("range of every key");
        assert_eq!(kvs.len(), 6);
    }

    #[test]
    fn range_prefix_ending_in_0xff() {
        let Some(server) = EtcdServer::start("range_prefix_ending_in_0xff") else {
            return;
        };
        let etcd = server.client();
        for key in [&b"a\xff"[..], b"a\xff\xff", b"a\xff\x00", b"b", b"a\xfe"] {
            etcd.put(key, b"", None).expect("put");
        }
        let (kvs, _) = etcd.range_prefix(b"a\xff").expect("range");
        let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, [&b"a\xff"[..], b"a\xff\x00", b"a\xff\xff"]);
    }

    #[test]
    fn watch_sees_put_delete_and_lease_revoke() {
        let Some(server) = EtcdServer::start("watch_sees_put_delete_and_lease_revoke") else {
            return;
        };
        let etcd = server.client();
        etcd.put(b"/hop/members/before", b"old", None).expect("put");
        let (kvs, revision) = etcd.range_prefix(b"/hop/members/").expect("range");
        assert_eq!(kvs.len(), 1);
        let watch = etcd
            .watch_prefix(b"/hop/members/", revision + 1, None)
            .expect("watch");

        let (lease, _) = etcd.grant(30).expect("grant");
        let put_a = etcd.put(b"/hop/members/a", b"A", Some(lease)).expect("put");
        etcd.put(b"/hop/elsewhere", b"", None).expect("put");
        let put_b = etcd.put(b"/hop/members/b", b"B", None).expect("put");
        etcd.delete(b"/hop/members/b").expect("delete");
        etcd.revoke(lease).expect("revoke");

        let events = collect_events(watch, 4);
        assert_eq!(
            events,
            [
                WatchEvent::Put(KeyValue {
                    key: b"/hop/members/a".to_vec(),
                    value: b"A".to_vec(),
                    mod_revision: put_a,
                    lease,
                }),
                WatchEvent::Put(KeyValue {
                    key: b"/hop/members/b".to_vec(),
                    value: b"B".to_vec(),
                    mod_revision: put_b,
                    lease: 0,
                }),
                WatchEvent::Delete {
                    key: b"/hop/members/b".to_vec(),
                    mod_revision: put_b + 1,
                },
                WatchEvent::Delete {
                    key: b"/hop/members/a".to_vec(),
                    mod_revision: put_b + 2,
                },
            ]
        );
    }

    #[test]
    fn watch_from_a_compacted_revision_is_compacted() {
        let Some(server) = EtcdServer::start("watch_from_a_compacted_revision_is_compacted") else {
            return;
        };
        let etcd = server.client();
        let first = etcd.put(b"/hop/members/a", b"1", None).expect("put");
        etcd.put(b"/hop/members/a", b"2", None).expect("put");
        let last = etcd.put(b"/hop/members/a", b"3", None).expect("put");
        server.compact(last);

        let mut watch = etcd
            .watch_prefix(b"/hop/members/", first, None)
            .expect("watch");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let first = watch.next_events();
            // etcd keeps a cancelled watch's connection open: the watch must not read on.
            let second = watch.next_events();
            let _ = sender.send((first, second));
        });
        let (first, second) = receiver.recv_timeout(WAIT).expect("an answer in time");
        assert!(
            matches!(first, Err(EtcdError::Compacted { compact_revision }) if compact_revision == last),
            "{first:?}"
        );
        assert!(
            matches!(second, Err(EtcdError::WatchEnded { .. })),
            "{second:?}"
        );
    }

    #[test]
    fn watch_ends_when_etcd_stops() {
        let Some(mut server) = EtcdServer::start("watch_ends_when_etcd_stops") else {
            return;
        };
        let etcd = server.client();
        let watch = etcd.watch_prefix(b"/hop/members/", 0, None).expect("watch");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut watch = watch;
            let _ = sender.send(watch.next_events());
        });
        // SIGKILL: no goodbye on the stream, the connection just closes.
        server.child.kill().expect("etcd stops");
        let result = receiver.recv_timeout(WAIT).expect("an answer in time");
        assert!(
            matches!(result, Err(EtcdError::WatchEnded { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn failover_past_dead_and_failing_endpoints() {
        let Some(server) = EtcdServer::start("failover_past_dead_and_failing_endpoints") else {
            return;
        };
        let unavailable = canned_endpoint(
            "503 Service Unavailable",
            r#"{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}"#,
        );
        let endpoints = [dead_endpoint(), unavailable, server.endpoint.clone()];
        let etcd = Etcd::new(&endpoints, TIMEOUT).expect("a client");
        let revision = etcd.put(b"/hop/k", b"v", None).expect("put");
        assert_eq!(etcd.answered_last.load(Ordering::Relaxed), 2);
        let kv = etcd.get(b"/hop/k").expect("get").expect("the key");
        assert_eq!(kv.mod_revision, revision);

        // A watch fails over the same way.
        let fresh = Etcd::new(&endpoints, TIMEOUT).expect("a client");
        let watch = fresh.watch_prefix(b"/hop/", revision, None).expect("watch");
        let events = collect_events(watch, 1);
        assert!(matches!(&events[0], WatchEvent::Put(kv) if kv.key == b"/hop/k"));
    }

    #[test]
    fn an_etcd_error_is_not_retried_elsewhere() {
        let Some(server) = EtcdServer::start("an_etcd_error_is_not_retried_elsewhere") else {
            return;
        };
        let refusing = canned_endpoint(
            "400 Bad Request",
            r#"{"error":"boom","message":"boom","code":3}"#,
        );
        let etcd = Etcd::new(&[refusing, server.endpoint.clone()], TIMEOUT).expect("a client");
        let error = etcd.get(b"/hop/k").expect_err("the first endpoint refuses");
        assert!(
            matches!(
                &error,
                EtcdError::Rejected { call: "kv range (get)", status: 400, code: 3, message }
                    if message == "boom"
            ),
            "{error:?}"
        );

        // And the real etcd's own refusals come back the same way.
        let error = server
            .client()
            .get(b"")
            .expect_err("etcd refuses an empty key");
        assert!(
            matches!(
                &error,
                EtcdError::Rejected {
                    status: 400,
                    code: 3,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn every_endpoint_dead_is_unreachable() {
        // This one needs no etcd: one endpoint refuses connections, the other accepts them
        // (the kernel's backlog does) and never answers, so only the timeout ends the request.
        let silent = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let silent_endpoint = format!("127.0.0.1:{}", silent.local_addr().expect("a port").port());
        let timeout = Duration::from_millis(300);
        let etcd = Etcd::new(&[dead_endpoint(), silent_endpoint], timeout).expect("a client");
        let started = Instant::now();
        let error = etcd.grant(10).expect_err("nobody answers");
        let elapsed = started.elapsed();
        match &error {
            EtcdError::Unreachable { call, last_error } => {
                assert_eq!(*call, "lease grant");
                assert!(last_error.contains("127.0.0.1"), "{last_error}");
                assert!(
                    last_error.to_lowercase().contains("timeout"),
                    "{last_error}"
                );
            }
            other => panic!("wanted Unreachable, got {other:?}"),
        }
        // Generous, so that a slow machine does not fail it: the point is that the timeout
        // applies, not how precisely.
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        assert!(matches!(
            etcd.watch_prefix(b"/hop/", 0, None),
            Err(EtcdError::Unreachable { call: "watch", .. })
        ));
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(matches!(
            Etcd::new(&[], TIMEOUT),
            Err(EtcdError::NoEndpoints)
        ));
        for bad in ["https://10.99.0.1:2379", "ftp://x:1", "http://", "a b:1"] {
            assert!(
                matches!(
                    Etcd::new(&[bad.to_string()], TIMEOUT),
                    Err(EtcdError::BadEndpoint { .. })
                ),
                "{bad}"
            );
        }
        let etcd = Etcd::new(
            &[
                "10.99.0.1:2379".to_string(),
                "http://10.99.0.2:2379/".to_string(),
            ],
            TIMEOUT,
        )
        .expect("a client");
        assert_eq!(
            etcd.endpoints,
            ["http://10.99.0.1:2379", "http://10.99.0.2:2379"]
        );
    }

    #[test]
    fn prefix_range_ends() {
        assert_eq!(prefix_range_end(b"/hop/"), b"/hop0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"a\xfe\xff\xff"), b"a\xff");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
        assert_eq!(prefix_start(b""), b"\0");
    }

    #[test]
    fn watch_answers_decode_as_the_gateway_writes_them() {
        // Copied from etcd 3.4.23's gateway: PUT has no "type", an empty value no "value".
        let line = r#"{"result":{"header":{"revision":"9"},"events":[
            {"kv":{"key":"L3cvYg==","create_revision":"8","mod_revision":"8","version":"1"}},
            {"type":"DELETE","kv":{"key":"L3cvYg==","mod_revision":"9"}},
            {"type":1,"kv":{"key":"L3cvYg==","mod_revision":10}}]}}"#;
        let answer: StreamAnswer<WatchAnswer> = serde_json::from_str(line).expect("decodes");
        let events = events_of(answer).expect("events");
        assert_eq!(
            events,
            [
                WatchEvent::Put(KeyValue {
                    key: b"/w/b".to_vec(),
                    value: Vec::new(),
                    mod_revision: 8,
                    lease: 0,
                }),
                WatchEvent::Delete {
                    key: b"/w/b".to_vec(),
                    mod_revision: 9,
                },
                WatchEvent::Delete {
                    key: b"/w/b".to_vec(),
                    mod_revision: 10,
                },
            ]
        );

        let created = r#"{"result":{"header":{"revision":"6"},"created":true}}"#;
        let answer: StreamAnswer<WatchAnswer> = serde_json::from_str(created).expect("decodes");
        assert_eq!(events_of(answer).expect("no events"), []);

        let stopping = r#"{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing","http_status":"Service Unavailable"}}"#;
        let answer: StreamAnswer<WatchAnswer> = serde_json::from_str(stopping).expect("decodes");
        let error = events_of(answer).expect_err("an error");
        assert!(
            matches!(&error, EtcdError::WatchEnded { reason } if reason.contains("transport is closing")),
            "{error:?}"
        );

        let cancelled = r#"{"result":{"canceled":true,"cancel_reason":"permission denied"}}"#;
        let answer: StreamAnswer<WatchAnswer> = serde_json::from_str(cancelled).expect("decodes");
        assert!(matches!(
            events_of(answer),
            Err(EtcdError::WatchCancelled { reason }) if reason == "permission denied"
        ));
    }

    #[test]
    fn bad_answers_are_errors_not_panics() {
        for line in [
            r#"{"result":{"events":[{"kv":{"key":"not base64!"}}]}}"#,
            r#"{"result":{"events":[{"type":"TOUCH","kv":{}}]}}"#,
            r#"{"result":{"compact_revision":"twelve"}}"#,
            r#"{"result":{"compact_revision":1e99}}"#,
            r#"{"result":"created"}"#,
        ] {
            assert!(
                serde_json::from_str::<StreamAnswer<WatchAnswer>>(line).is_err(),
                "{line}"
            );
        }
        let empty: StreamAnswer<WatchAnswer> = serde_json::from_str("{}").expect("decodes");
        assert!(matches!(
            events_of(empty),
            Err(EtcdError::BadAnswer { call: "watch", .. })
        ));
        assert!(matches!(
            rejection("kv put", 404, b"Not Found\n"),
            EtcdError::Rejected {
                status: 404,
                code: 0,
                ..
            }
        ));
        assert!(matches!(
            rejection(
                "kv put",
                404,
                br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#
            ),
            EtcdError::LeaseExpired
        ));
    }

    #[test]
    fn watch_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Watch>();
        assert_send::<Etcd>();
        fn assert_sync<T: Sync>() {}
        assert_sync::<Etcd>();
    }
}
