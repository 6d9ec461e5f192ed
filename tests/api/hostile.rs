//! Hostile input through the real binary: each call is answered correctly
//! within a bound, and afterwards the process is still serving within a
//! stated memory bound of where it started.

use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _};
use keywarden::api::pb;
use prost::Message as _;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

use crate::helpers::{ADMIN_TOKEN, MERCHANT, allowed, outcome, spawn_binary};

/// Each hostile call must be answered within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The server's resident memory may grow by at most this over the suite
/// (allocator caches and the first use of each code path; the suite sends
/// tens of megabytes in all).
const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;

/// Sends and receives protobuf bytes as they are, so a test can send what
/// no well-behaved client would encode.
#[derive(Debug, Clone, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.chunk().to_vec();
        src.advance(bytes.len());
        Ok(Some(bytes))
    }
}

/// One raw call to `path`, answered within [`ANSWER_WITHIN`].
async fn raw_call(channel: &Channel, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let started = Instant::now();
    let answer = tokio::time::timeout(ANSWER_WITHIN, async {
        grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(body);
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
        grpc.unary(request, PathAndQuery::from_static(path), Raw).await.map(tonic::Response::into_inner)
    })
    .await
    .unwrap_or_else(|_| panic!("{path} not answered within {ANSWER_WITHIN:?}"));
    assert!(started.elapsed() < ANSWER_WITHIN);
    answer
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A protobuf field: tag, then a length-delimited value.
fn field(number: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    out
}

fn assert_code(answer: Result<Vec<u8>, Status>, code: Code, case: &str) -> Status {
    let status = answer.expect_err(case);
    assert_eq!(status.code(), code, "{case}: {status:?}");
    assert!(status.message().len() <= 2048, "{case}: a {}-byte message", status.message().len());
    status
}

const VERIFY: &str = "/keywarden.v1.KeyVerify/Verify";
const OUTCOMES: &str = "/keywarden.v1.KeyVerify/RecordOutcomes";
const LIST_KEYS: &str = "/keywarden.v1.KeyAdmin/ListKeys";
const UPDATE_KEY: &str = "/keywarden.v1.KeyAdmin/UpdateKey";
const CREATE_KEY: &str = "/keywarden.v1.KeyAdmin/CreateKey";

/// Every case once; returns nothing, asserts each answer.
async fn hostile_suite(channel: &Channel, key: &str, key_id: &str) {
    // One oversized request per RPC.
    let big_endpoint =
        pb::VerifyRequest { key: key.into(), endpoint: "/".repeat(20 << 10), ..Default::default() };
    let status = assert_code(
        raw_call(channel, VERIFY, big_endpoint.encode_to_vec()).await,
        Code::OutOfRange,
        "20 KiB Verify",
    );
    assert!(status.message().contains("16384"), "{}", status.message());
    let two_million = [0x0a_u8, 0x00].repeat(2_000_000);
    assert_code(raw_call(channel, OUTCOMES, two_million).await, Code::OutOfRange, "4 MB RecordOutcomes");
    let over_admin = field(1, &vec![b'm'; 2 << 20]);
    assert_code(raw_call(channel, LIST_KEYS, over_admin).await, Code::OutOfRange, "2 MiB ListKeys");
    let create = field(2, &vec![b'n'; 1 << 20]);
    assert_code(raw_call(channel, CREATE_KEY, create).await, Code::OutOfRange, "1 MiB + CreateKey");

    // RecordOutcomes at the limit and past it, within the size limit.
    let outcomes = |n: usize| {
        pb::RecordOutcomesRequest {
            outcomes: (0..n)
                .map(|_| pb::Outcome { audit_event_id: uuid::Uuid::now_v7().to_string(), status: 200 })
                .collect(),
        }
        .encode_to_vec()
    };
    let at_limit = raw_call(channel, OUTCOMES, outcomes(1000)).await.expect("1000 outcomes");
    assert_eq!(pb::RecordOutcomesResponse::decode(at_limit.as_slice()).unwrap().updated, 0);
    assert_code(raw_call(channel, OUTCOMES, outcomes(1001)).await, Code::InvalidArgument, "1001 outcomes");
    let empties = [0x0a_u8, 0x00].repeat(100_000);
    assert_code(raw_call(channel, OUTCOMES, empties).await, Code::InvalidArgument, "100k empty outcomes");

    // Deeply repeated fields: the key field 1800 times, just under the
    // Verify limit (the last one wins), the update mask 50,000 paths long.
    let mut repeated: Vec<u8> = (0..1800).flat_map(|_| field(1, b"sntr_x")).collect();
    repeated.extend(field(1, key.as_bytes()));
    let answer = raw_call(channel, VERIFY, repeated).await.expect("a Verify with its key repeated");
    assert_eq!(outcome(&pb::VerifyResponse::decode(answer.as_slice()).unwrap()), allowed());
    let update = pb::UpdateKeyRequest {
        merchant_id: MERCHANT.into(),
        key_id: key_id.into(),
        update_mask: Some(prost_types::FieldMask { paths: (0..50_000).map(|i| format!("p{i}")).collect() }),
        ..Default::default()
    };
    assert_code(
        raw_call(channel, UPDATE_KEY, update.encode_to_vec()).await,
        Code::InvalidArgument,
        "50k mask paths",
    );

    // A huge page token and endpoint, within the size limits.
    let list = pb::ListKeysRequest {
        merchant_id: MERCHANT.into(),
        page_token: "A".repeat(900 << 10),
        ..Default::default()
    };
    assert_code(
        raw_call(channel, LIST_KEYS, list.encode_to_vec()).await,
        Code::InvalidArgument,
        "900 KiB page token",
    );
    let endpoint =
        pb::VerifyRequest { key: key.into(), endpoint: "/".repeat(15 << 10), ..Default::default() };
    assert_code(
        raw_call(channel, VERIFY, endpoint.encode_to_vec()).await,
        Code::InvalidArgument,
        "15 KiB endpoint",
    );

    // Non-UTF-8 bytes in a string field, and garbage that is not protobuf.
    let mut not_utf8 = field(1, &[0xff, 0xfe, 0xfd]);
    not_utf8.extend(field(3, &[0xc3, 0x28]));
    assert_code(raw_call(channel, VERIFY, not_utf8).await, Code::Internal, "non-UTF-8 key");
    assert_code(raw_call(channel, VERIFY, vec![0xff; 4096]).await, Code::Internal, "not protobuf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_answered_within_bounds_and_leaves_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}?mode=rwc", dir.path().join("hostile.db").display());
    let replica = spawn_binary(&database_url, dir.path(), &[]);
    let channel = crate::helpers::connect(replica.addr).await;
    let mut admin = crate::helpers::admin_client(channel.clone(), ADMIN_TOKEN);
    let (key_id, key) = crate::helpers::create_sales_key(&mut admin, "hostile").await;
    let mut verify = pb::key_verify_client::KeyVerifyClient::new(channel.clone());
    let request = || pb::VerifyRequest { key: key.clone(), ..Default::default() };
    assert_eq!(outcome(&verify.verify(request()).await.unwrap().into_inner()), allowed());
    // Once through, so that every path has run before the baseline.
    hostile_suite(&channel, &key, &key_id).await;
    let before = rss_kib(replica.child.id());
    for _ in 0..10 {
        hostile_suite(&channel, &key, &key_id).await;
    }
    let after = rss_kib(replica.child.id());
    eprintln!("server RSS: {before} KiB before ten rounds of hostile input, {after} KiB after");
    assert!(
        after <= before + RSS_GROWTH_BOUND_KIB,
        "RSS grew from {before} KiB to {after} KiB (bound: +{RSS_GROWTH_BOUND_KIB} KiB)"
    );
    assert_eq!(outcome(&verify.verify(request()).await.unwrap().into_inner()), allowed(), "still serving");
    crate::helpers::sigterm(&replica.child);
    assert!(crate::helpers::exited(replica.child).await.success());
}
