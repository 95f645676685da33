//! The todo itself: what a client may send (checked here, before anything
//! touches the database) and what it gets back, in Todo-Backend's shape.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Longest title accepted, in characters (Unicode scalar values). A todo is
/// a line of text; the limit keeps one request from storing a document.
pub const TITLE_MAX_CHARS: usize = 1000;

/// Largest request body read, in bytes: room for a maximal title even when
/// every character is sent as a `\uXXXX` escape, and nothing much beyond.
pub const BODY_LIMIT_BYTES: usize = 16 * 1024;

/// A todo as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Todo {
    pub id: i64,
    pub title: String,
    pub completed: bool,
    pub order: Option<i64>,
}

/// A todo as served: Todo-Backend's fields plus its own absolute `url`.
/// It borrows, so a list is written out straight from the database rows.
#[derive(Debug, Serialize)]
pub struct TodoView<'a> {
    pub id: i64,
    pub title: &'a str,
    pub completed: bool,
    pub order: Option<i64>,
    pub url: TodoUrl<'a>,
}

impl Todo {
    /// `base` is the scheme and host the client used, e.g. `http://host`.
    pub fn view<'a>(&'a self, base: &'a str) -> TodoView<'a> {
        TodoView {
            id: self.id,
            title: &self.title,
            completed: self.completed,
            order: self.order,
            url: TodoUrl { base, id: self.id },
        }
    }
}

/// A list of todos as a JSON body, written into a buffer sized for it up
/// front: grown from empty, a 100-todo list (10 KB) was copied five times
/// on its way out.
pub fn list_json(views: &[TodoView<'_>]) -> Result<Vec<u8>, serde_json::Error> {
    // The fixed part of one todo with its keys is about 70 bytes.
    let size: usize = views
        .iter()
        .map(|v| v.title.len() + v.url.base.len() + 96)
        .sum();
    let mut body = Vec::with_capacity(size + 2);
    serde_json::to_writer(&mut body, views)?;
    Ok(body)
}

/// The absolute URL of a todo, written out only when serialized.
#[derive(Clone, Copy, Debug)]
pub struct TodoUrl<'a> {
    pub base: &'a str,
    pub id: i64,
}

impl std::fmt::Display for TodoUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/todos/{}", self.base, self.id)
    }
}

impl Serialize for TodoUrl<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The body of `POST /todos`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTodo {
    pub title: String,
    pub completed: bool,
    pub order: Option<i64>,
}

/// The body of `PATCH /todos/{id}`: only the fields present change.
/// `order: null` clears the order, hence the nested option.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TodoPatch {
    pub title: Option<String>,
    pub completed: Option<bool>,
    pub order: Option<Option<i64>>,
}

impl TodoPatch {
    pub fn is_empty(&self) -> bool {
        self.title.is_none() && self.completed.is_none() && self.order.is_none()
    }
}

/// Parses a JSON object body. Syntax errors are the client's malformed
/// request (400); a well-formed body of the wrong shape is 422. Fields this
/// API does not know (a client sending back `url` or `id`) are ignored.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson("the request body is empty".into()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::InvalidTodo(format!(
            "expected a JSON object, got {}",
            kind(&other)
        ))),
        Err(e) => Err(ApiError::InvalidJson(e.to_string())),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn title(v: &Value) -> Result<String, ApiError> {
    let Value::String(s) = v else {
        return Err(ApiError::InvalidTodo(format!(
            "title must be a string, got {}",
            kind(v)
        )));
    };
    if s.trim().is_empty() {
        return Err(ApiError::InvalidTodo("title must not be empty".into()));
    }
    if s.chars().count() > TITLE_MAX_CHARS {
        return Err(ApiError::InvalidTodo(format!(
            "title must be at most {TITLE_MAX_CHARS} characters"
        )));
    }
    // PostgreSQL text cannot hold NUL; refuse it here rather than fail there.
    if s.contains('\0') {
        return Err(ApiError::InvalidTodo(
            "title must not contain NUL characters".into(),
        ));
    }
    Ok(s.clone())
}

fn completed(v: &Value) -> Result<bool, ApiError> {
    v.as_bool().ok_or_else(|| {
        ApiError::InvalidTodo(format!("completed must be true or false, got {}", kind(v)))
    })
}

fn order(v: &Value) -> Result<Option<i64>, ApiError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::InvalidTodo(format!("order must be an integer, got {n}"))),
        other => Err(ApiError::InvalidTodo(format!(
            "order must be an integer, got {}",
            kind(other)
        ))),
    }
}

impl NewTodo {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let map = parse_object(body)?;
        let title = match map.get("title") {
            Some(v) => title(v)?,
            None => return Err(ApiError::InvalidTodo("title is required".into())),
        };
        Ok(NewTodo {
            title,
            completed: map
                .get("completed")
                .map(completed)
                .transpose()?
                .unwrap_or(false),
            order: map.get("order").map(order).transpose()?.flatten(),
        })
    }
}

impl TodoPatch {
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let map = parse_object(body)?;
        Ok(TodoPatch {
            title: map.get("title").map(title).transpose()?,
            completed: map.get("completed").map(completed).transpose()?,
            order: map.get("order").map(order).transpose()?,
        })
    }
}

/// A todo id from a URL path; anything that is not one names no todo.
pub fn parse_id(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ApiError) -> u16 {
        actix_web::ResponseError::status_code(&e).as_u16()
    }

    #[test]
    fn new_todo_needs_only_a_title() {
        let t = NewTodo::parse(br#"{"title":"walk the dog"}"#).unwrap();
        assert_eq!(
            t,
            NewTodo {
                title: "walk the dog".into(),
                completed: false,
                order: None
            }
        );
        let t = NewTodo::parse(br#"{"title":"x","order":523,"url":"ignored"}"#).unwrap();
        assert_eq!(t.order, Some(523));
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shapes_are_422() {
        assert_eq!(status(NewTodo::parse(b"{\"title\":").unwrap_err()), 400);
        assert_eq!(status(NewTodo::parse(b"").unwrap_err()), 400);
        assert_eq!(status(NewTodo::parse(b"\xff\xfe").unwrap_err()), 400);
        assert_eq!(status(NewTodo::parse(b"[1]").unwrap_err()), 422);
        assert_eq!(status(NewTodo::parse(b"{}").unwrap_err()), 422);
        assert_eq!(status(NewTodo::parse(br#"{"title":5}"#).unwrap_err()), 422);
        assert_eq!(
            status(NewTodo::parse(br#"{"title":"a","completed":"yes"}"#).unwrap_err()),
            422
        );
        assert_eq!(
            status(NewTodo::parse(br#"{"title":"a","order":1.5}"#).unwrap_err()),
            422
        );
        assert_eq!(
            status(NewTodo::parse(br#"{"title":"a","order":"1"}"#).unwrap_err()),
            422
        );
    }

    #[test]
    fn titles_must_be_non_blank_bounded_and_storable() {
        assert!(NewTodo::parse(br#"{"title":"  \t "}"#).is_err());
        assert!(NewTodo::parse(br#"{"title":"a\u0000b"}"#).is_err());
        let longest = "é".repeat(TITLE_MAX_CHARS);
        let body = serde_json::json!({ "title": longest }).to_string();
        assert_eq!(NewTodo::parse(body.as_bytes()).unwrap().title, longest);
        let body = serde_json::json!({ "title": format!("{longest}x") }).to_string();
        assert_eq!(status(NewTodo::parse(body.as_bytes()).unwrap_err()), 422);
    }

    #[test]
    fn patch_tells_absent_from_null_order() {
        assert!(TodoPatch::parse(b"{}").unwrap().is_empty());
        assert_eq!(
            TodoPatch::parse(br#"{"order":null}"#).unwrap().order,
            Some(None)
        );
        assert_eq!(
            TodoPatch::parse(br#"{"order":95}"#).unwrap().order,
            Some(Some(95))
        );
        let p = TodoPatch::parse(br#"{"completed":true,"title":"new"}"#).unwrap();
        assert_eq!((p.completed, p.title.as_deref()), (Some(true), Some("new")));
        assert_eq!(
            status(TodoPatch::parse(br#"{"title":""}"#).unwrap_err()),
            422
        );
        assert_eq!(
            status(TodoPatch::parse(br#"{"completed":null}"#).unwrap_err()),
            422
        );
    }

    #[test]
    fn only_positive_integers_are_ids() {
        assert_eq!(parse_id("42"), Some(42));
        for bad in ["0", "-1", "abc", "1.0", "99999999999999999999", ""] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn views_carry_an_absolute_url() {
        let t = Todo {
            id: 7,
            title: "x".into(),
            completed: false,
            order: None,
        };
        let v = serde_json::to_value(t.view("https://todo.example")).unwrap();
        assert_eq!(v["url"], "https://todo.example/todos/7");
        assert_eq!(v["order"], Value::Null);
        assert_eq!(v["completed"], false);
    }
}
