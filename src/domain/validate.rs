//! Small validators for client input, shared by every service. Each returns an
//! `invalid_argument` [`ApiError`] whose message names the offending field, so a
//! client developer can fix the request without reading the server's code.
//! Lengths are counted in characters (Unicode scalar values), not bytes.

use base64::Engine as _;

use crate::error::ApiError;

/// Shortest username.
pub const USERNAME_MIN_CHARS: usize = 3;
/// Longest username.
pub const USERNAME_MAX_CHARS: usize = 32;
/// Shortest password.
pub const PASSWORD_MIN_CHARS: usize = 8;
/// Longest password.
pub const PASSWORD_MAX_CHARS: usize = 256;
/// Longest display name.
pub const DISPLAY_NAME_MAX_CHARS: usize = 64;
/// Longest avatar URL.
pub const AVATAR_URL_MAX_CHARS: usize = 512;
/// Longest bio.
pub const BIO_MAX_CHARS: usize = 512;
/// Longest id a client may send; generated ids are far shorter.
pub const ID_MAX_CHARS: usize = 64;
/// Longest page token a client may send.
pub const PAGE_TOKEN_MAX_CHARS: usize = 512;

/// Checks that `value` has `min..=max` characters. An empty value with `min > 0`
/// reads "`field` is required".
pub fn char_len(field: &str, value: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len == 0 && min > 0 {
        return Err(ApiError::invalid(format!("{field} is required")));
    }
    if len < min {
        return Err(ApiError::invalid(format!(
            "{field} must be at least {min} characters"
        )));
    }
    if len > max {
        return Err(ApiError::invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(())
}

/// Checks that `value` is not empty.
pub fn required(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(format!("{field} is required")));
    }
    Ok(())
}

/// Rejects control characters (newlines, NUL, escapes) in single-line text.
pub fn single_line(field: &str, value: &str) -> Result<(), ApiError> {
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

/// Rejects NUL and the other control characters except tab and line breaks, in
/// multi-line text (message text, metadata): PostgreSQL refuses NUL in text, and
/// escapes and bells have no place in a chat message.
pub fn no_control_chars(field: &str, value: &str) -> Result<(), ApiError> {
    if let Some(c) = value
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

/// An opaque id sent by a client: 1–64 printable ASCII characters.
pub fn id<'a>(field: &str, value: &'a str) -> Result<&'a str, ApiError> {
    char_len(field, value, 1, ID_MAX_CHARS)?;
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(format!("{field} is not a valid id")));
    }
    Ok(value)
}

/// A username, trimmed and lower-cased: 3–32 characters of `a-z`, `0-9`, `_`, `-`, `.`.
pub fn username(value: &str) -> Result<String, ApiError> {
    let name = value.trim().to_lowercase();
    char_len("username", &name, USERNAME_MIN_CHARS, USERNAME_MAX_CHARS)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
    {
        return Err(ApiError::invalid(
            "username may only contain a-z, 0-9, '_', '-' and '.'",
        ));
    }
    Ok(name)
}

/// A new password: 8–256 characters, taken as is (never trimmed).
pub fn password(value: &str) -> Result<(), ApiError> {
    char_len("password", value, PASSWORD_MIN_CHARS, PASSWORD_MAX_CHARS)
}

/// A display name given at sign-up: trimmed, at most 64 characters, defaulting to
/// `fallback` (the username) when empty.
pub fn display_name_or(value: &str, fallback: &str) -> Result<String, ApiError> {
    let name = value.trim();
    if name.is_empty() {
        return Ok(fallback.to_owned());
    }
    display_name(name)
}

/// A display name: trimmed, 1–64 characters, one line.
pub fn display_name(value: &str) -> Result<String, ApiError> {
    let name = value.trim();
    char_len("display_name", name, 1, DISPLAY_NAME_MAX_CHARS)?;
    single_line("display_name", name)?;
    Ok(name.to_owned())
}

/// An `http://` or `https://` URL of at most `max` characters, or empty (which
/// clears the field). Only the shape is checked; the server never fetches it.
pub fn http_url_or_empty(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let url = value.trim();
    if url.is_empty() {
        return Ok(String::new());
    }
    char_len(field, url, 1, max)?;
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"));
    match rest {
        Some(host_and_path) if !host_and_path.is_empty() && !host_and_path.starts_with('/') => {}
        _ => {
            return Err(ApiError::invalid(format!(
                "{field} must be an http:// or https:// URL"
            )))
        }
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid(format!(
            "{field} must not contain spaces or control characters"
        )));
    }
    Ok(url.to_owned())
}

/// A page size: `0` means `default`; otherwise `1..=max`.
pub fn page_size(field: &str, value: u32, default: u32, max: u32) -> Result<u32, ApiError> {
    match value {
        0 => Ok(default),
        n if n <= max => Ok(n),
        _ => Err(ApiError::invalid(format!("{field} must be at most {max}"))),
    }
}

/// Encodes the cursor of the last item of a page (e.g. its id) as an opaque token.
pub fn encode_page_token(cursor: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cursor.as_bytes())
}

/// Decodes a token made by [`encode_page_token`]; `None` for an empty token (the
/// first page).
pub fn decode_page_token(field: &str, token: &str) -> Result<Option<String>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || ApiError::invalid(format!("{field} is not a token this server returned"));
    if token.len() > PAGE_TOKEN_MAX_CHARS {
        return Err(invalid());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.as_bytes())
        .map_err(|_| invalid())?;
    let cursor = String::from_utf8(bytes).map_err(|_| invalid())?;
    if cursor.is_empty() {
        return Err(invalid());
    }
    Ok(Some(cursor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Code;

    fn message(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        let err = result.expect_err("expected a validation error");
        assert_eq!(err.code, Code::InvalidArgument);
        err.message
    }

    #[test]
    fn usernames_are_lower_cased_and_checked() {
        assert_eq!(username("  Alice.B-2_ ").expect("valid"), "alice.b-2_");
        assert_eq!(message(username("")), "username is required");
        assert_eq!(
            message(username("ab")),
            "username must be at least 3 characters"
        );
        assert_eq!(
            message(username(&"a".repeat(33))),
            "username must be at most 32 characters"
        );
        assert!(message(username("al ice")).contains("may only contain"));
        assert!(message(username("élodie")).contains("may only contain"));
    }

    #[test]
    fn passwords_are_counted_in_characters() {
        assert_eq!(message(password("")), "password is required");
        assert_eq!(
            message(password("short")),
            "password must be at least 8 characters"
        );
        assert!(password("ééééééééé").is_ok());
        assert_eq!(
            message(password(&"x".repeat(257))),
            "password must be at most 256 characters"
        );
    }

    #[test]
    fn display_names_default_and_are_bounded() {
        assert_eq!(display_name_or("   ", "alice").expect("valid"), "alice");
        assert_eq!(display_name_or(" Alice ", "alice").expect("valid"), "Alice");
        assert_eq!(message(display_name("  ")), "display_name is required");
        assert_eq!(
            message(display_name(&"x".repeat(65))),
            "display_name must be at most 64 characters"
        );
        assert!(message(display_name("a\nb")).contains("control characters"));
    }

    #[test]
    fn urls_must_be_http() {
        assert_eq!(http_url_or_empty("avatar_url", "", 512).expect("valid"), "");
        assert!(http_url_or_empty("avatar_url", "https://x.example/a.png", 512).is_ok());
        assert!(
            message(http_url_or_empty("avatar_url", "javascript:alert(1)", 512))
                .starts_with("avatar_url")
        );
        assert!(message(http_url_or_empty("avatar_url", "https://", 512)).starts_with("avatar_url"));
        assert!(message(http_url_or_empty("avatar_url", "https://a b", 512)).contains("spaces"));
        let long = format!("https://x.example/{}", "a".repeat(600));
        assert_eq!(
            message(http_url_or_empty("avatar_url", &long, 512)),
            "avatar_url must be at most 512 characters"
        );
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size("page_size", 0, 20, 100).expect("valid"), 20);
        assert_eq!(page_size("page_size", 100, 20, 100).expect("valid"), 100);
        assert_eq!(
            message(page_size("page_size", 101, 20, 100)),
            "page_size must be at most 100"
        );
    }

    #[test]
    fn page_tokens_round_trip() {
        let token = encode_page_token("u_abc");
        assert_eq!(
            decode_page_token("page_token", &token)
                .expect("valid")
                .as_deref(),
            Some("u_abc")
        );
        assert_eq!(decode_page_token("page_token", "").expect("valid"), None);
        assert!(message(decode_page_token("page_token", "!!!")).starts_with("page_token"));
    }

    #[test]
    fn ids() {
        assert_eq!(message(id("id", "")), "id is required");
        assert!(message(id("ids[2]", "a b")).starts_with("ids[2]"));
        assert_eq!(id("id", "u_x").expect("valid"), "u_x");
    }
}
