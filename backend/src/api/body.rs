//! `Body<T>`: the JSON request body extractor of the API. It sorts failures
//! the way a client can act on them: not JSON at all is 400, JSON that does
//! not fit the schema (unknown field, wrong type, unknown enum value) is 422,
//! too big is 413, another content type is 415.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::error::PayloadError;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct Body<T>(pub T);

impl<T> Body<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

fn is_json(req: &HttpRequest) -> bool {
    match req.mime_type() {
        Ok(Some(mime)) => mime.subtype() == mime::JSON || mime.suffix() == Some(mime::JSON),
        _ => false,
    }
}

/// JSON Schema counts `3.0` as an integer; serde does not. Numbers with no
/// fraction become integers before the schema is applied, so clients that
/// write integers as floats (JavaScript, some YAML tools) are understood.
fn integral_floats_to_integers(value: &mut serde_json::Value) {
    use serde_json::{Number, Value};
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
            {
                // The casts saturate; an out-of-range float stays a float.
                if f >= 0.0 && f <= u64::MAX as f64 && (f as u64) as f64 == f {
                    *n = Number::from(f as u64);
                } else if f < 0.0 && f >= i64::MIN as f64 && (f as i64) as f64 == f {
                    *n = Number::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_to_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_to_integers),
        _ => {}
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let json = is_json(req);
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            if !json {
                return Err(ApiError::UnsupportedMediaType(
                    "the body must be JSON (Content-Type: application/json)".into(),
                ));
            }
            let bytes = bytes
                .await
                .map_err(|e| match e.as_error::<PayloadError>() {
                    Some(PayloadError::Overflow) => ApiError::PayloadTooLarge(format!(
                        "the body exceeds the limit of {} bytes",
                        super::MAX_BODY_BYTES
                    )),
                    _ => ApiError::BadRequest(format!("could not read the body: {e}")),
                })?;
            let mut value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
            integral_floats_to_integers(&mut value);
            serde_json::from_value(value)
                .map(Body)
                .map_err(|e| ApiError::Unprocessable(format!("invalid body: {e}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_floats_become_integers_and_others_stay() {
        let mut v = serde_json::json!({"a": 3.0, "b": [-2.0, 1.5], "c": 1e300, "d": "3.0"});
        integral_floats_to_integers(&mut v);
        assert_eq!(v["a"], serde_json::json!(3));
        assert!(v["a"].is_u64());
        assert!(v["b"][0].is_i64());
        assert!(v["b"][1].is_f64());
        assert!(v["c"].is_f64(), "beyond u64 stays a float");
        assert_eq!(v["d"], "3.0");
    }
}
