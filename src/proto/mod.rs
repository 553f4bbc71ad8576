//! The protobuf API: the `.proto` files under `src/proto/roomcast/v1/` (and the
//! node-to-node messages under `src/proto/roomcast/node/v1/`) are the single
//! source of truth. `build.rs` compiles them into the prost types, the canonical
//! proto3 JSON mapping (pbjson) and a table of method names per service.

/// `roomcast.v1`: every message and service of the public API.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/roomcast.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/roomcast.v1.serde.rs"));
}

/// `roomcast.node.v1`: what nodes tell each other through the cluster broker
/// (`src/proto/roomcast/node/v1/node.proto`; see [`crate::cluster`]). Never sent
/// to clients.
pub mod node {
    /// Version 1 of the node-to-node messages.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/roomcast.node.v1.rs"));
    }
}

/// `google.protobuf.Timestamp`, with the canonical proto3 JSON form: RFC 3339 in
/// UTC with a `Z` and 0, 3, 6 or 9 fractional digits (`2024-05-01T12:00:00.250Z`).
/// `pbjson_types::Timestamp` writes `+00:00` instead, which protobuf-es (and so
/// connect-es) refuses when the time has fractional seconds. Any RFC 3339 form is
/// accepted on input.
#[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Non-negative fractions of a second, 0..=999_999_999.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// Seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range proto3
/// JSON allows.
const TIMESTAMP_MIN_SECONDS: i64 = -62_135_596_800;
const TIMESTAMP_MAX_SECONDS: i64 = 253_402_300_799;

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !(TIMESTAMP_MIN_SECONDS..=TIMESTAMP_MAX_SECONDS).contains(&self.seconds)
            || !(0..1_000_000_000).contains(&self.nanos)
        {
            return Err(serde::ser::Error::custom(
                "timestamp out of the range proto3 JSON allows",
            ));
        }
        let days = self.seconds.div_euclid(86_400);
        let secs = self.seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let mut text = format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        );
        let nanos = self.nanos;
        if nanos != 0 {
            if nanos % 1_000_000 == 0 {
                text.push_str(&format!(".{:03}", nanos / 1_000_000));
            } else if nanos % 1_000 == 0 {
                text.push_str(&format!(".{:06}", nanos / 1_000));
            } else {
                text.push_str(&format!(".{nanos:09}"));
            }
        }
        text.push('Z');
        serializer.serialize_str(&text)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let parsed = pbjson_types::Timestamp::deserialize(deserializer)?;
        Ok(Self {
            seconds: parsed.seconds,
            nanos: parsed.nanos,
        })
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::Timestamp;

    fn json(seconds: i64, nanos: i32) -> String {
        serde_json::to_string(&Timestamp { seconds, nanos }).expect("in range")
    }

    #[test]
    fn timestamps_are_z_normalized_rfc3339() {
        assert_eq!(json(0, 0), "\"1970-01-01T00:00:00Z\"");
        assert_eq!(
            json(1_700_000_000, 250_000_000),
            "\"2023-11-14T22:13:20.250Z\""
        );
        assert_eq!(json(951_782_400, 1_000), "\"2000-02-29T00:00:00.000001Z\"");
        assert_eq!(json(-1, 5), "\"1969-12-31T23:59:59.000000005Z\"");
        assert_eq!(json(-62_135_596_800, 0), "\"0001-01-01T00:00:00Z\"");
        assert_eq!(json(253_402_300_799, 0), "\"9999-12-31T23:59:59Z\"");
        assert!(serde_json::to_string(&Timestamp {
            seconds: 253_402_300_800,
            nanos: 0
        })
        .is_err());
    }

    #[test]
    fn any_rfc3339_form_is_read() {
        for text in [
            "\"2023-11-14T22:13:20.250Z\"",
            "\"2023-11-14T23:13:20.25+01:00\"",
        ] {
            let t: Timestamp = serde_json::from_str(text).expect("valid");
            assert_eq!((t.seconds, t.nanos), (1_700_000_000, 250_000_000));
        }
        assert!(serde_json::from_str::<Timestamp>("\"yesterday\"").is_err());
    }
}
