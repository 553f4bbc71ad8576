//! Small validators for client input, shared by every service. Each returns an
//! `invalid_argument` [`ApiError`] whose message names the offending field, so a
//! client developer can fix the request without reading the server's code.
//! Lengths are counted in characters (Unicode scalar values), not bytes.
//!
//! Text that people read (names, titles, bios) refuses control characters and
//! invisible formatting characters (general category `Cf`: bidi overrides and
//! isolates, zero-width spaces and joiners, soft hyphens, BOMs, tags), which let a
//! name look like another one or reorder the text around it; see
//! [`no_format_characters`] for the few contexts where a script or an emoji needs
//! one. Usernames are NFKC-normalised before they are checked (`ｆｏｏ` is `foo`).
//! New passwords must pass [`password`]'s strength rules, which include a list of
//! common passwords built into the binary (`common_passwords.txt`).

use std::{collections::HashSet, sync::OnceLock};

use base64::Engine as _;
use unicode_normalization::UnicodeNormalization as _;
use unicode_properties::{GeneralCategory, UnicodeEmoji as _, UnicodeGeneralCategory as _};

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

/// Rejects control characters (newlines, NUL, escapes, line and paragraph
/// separators) and invisible formatting characters ([`no_format_characters`]) in
/// single-line text.
pub fn single_line(field: &str, value: &str) -> Result<(), ApiError> {
    if value
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    no_format_characters(field, value)
}

/// Like [`single_line`] for text of several lines (a bio): newlines (`\n`,
/// `\r\n`) and tabs are allowed, other control characters (ESC, BEL, NUL, ...)
/// and invisible formatting characters are not.
pub fn multi_line(field: &str, value: &str) -> Result<(), ApiError> {
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::invalid(format!(
            "{field} must not contain control characters other than newlines and tabs"
        )));
    }
    no_format_characters(field, value)
}

/// Rejects invisible formatting characters (Unicode general category `Cf`):
/// bidi overrides, embeddings and isolates (U+202A–U+202E, U+2066–U+2069), marks
/// (U+200E, U+200F, U+061C), zero-width space, joiners and word joiner, soft
/// hyphen, BOM, invisible operators, tags. The error names the first one.
///
/// Allowed where writing needs them (as in the contexts of RFC 5892 and of
/// Unicode emoji sequences): a zero-width joiner or non-joiner after a virama
/// (Indic conjuncts), a zero-width non-joiner between two Arabic-script letters
/// (Persian), a zero-width joiner between two emoji (👩‍💻), and tag characters
/// after a black flag (🏴 subdivision flags).
pub fn no_format_characters(field: &str, value: &str) -> Result<(), ApiError> {
    let chars: Vec<char> = value.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.general_category() != GeneralCategory::Format {
            continue;
        }
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        if format_character_allowed(c, before, after, &chars[..i]) {
            continue;
        }
        return Err(ApiError::invalid(format!(
            "{field} must not contain invisible formatting characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

/// `value` without any invisible formatting character (for text that is cleaned
/// rather than refused, such as names in external tokens).
pub fn strip_format_characters(value: &str) -> String {
    value
        .chars()
        .filter(|c| c.general_category() != GeneralCategory::Format)
        .collect()
}

/// Unicode's canonical combining class of viramas.
const VIRAMA_COMBINING_CLASS: u8 = 9;

fn format_character_allowed(
    c: char,
    before: Option<char>,
    after: Option<char>,
    preceding: &[char],
) -> bool {
    let after_virama = before.is_some_and(|b| {
        unicode_normalization::char::canonical_combining_class(b) == VIRAMA_COMBINING_CLASS
    });
    match c {
        '\u{200D}' => {
            after_virama
                || (before.is_some_and(|b| b.is_emoji_char_or_emoji_component())
                    && after.is_some_and(|a| a.is_emoji_char()))
        }
        '\u{200C}' => {
            after_virama
                || (before.is_some_and(is_arabic_letter) && after.is_some_and(is_arabic_letter))
        }
        '\u{E0020}'..='\u{E007F}' => preceding
            .iter()
            .rev()
            .find(|p| !matches!(p, '\u{E0020}'..='\u{E007F}'))
            .is_some_and(|p| *p == '\u{1F3F4}'),
        _ => false,
    }
}

/// A letter of the Arabic script (Arabic, Persian, Urdu, ...).
fn is_arabic_letter(c: char) -> bool {
    matches!(c,
        '\u{0600}'..='\u{06FF}' | '\u{0750}'..='\u{077F}' | '\u{08A0}'..='\u{08FF}'
        | '\u{FB50}'..='\u{FDFF}' | '\u{FE70}'..='\u{FEFF}')
        && c.general_category() == GeneralCategory::OtherLetter
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

/// A username, NFKC-normalised (so `ｆｏｏ` and `ﬁ` are `foo` and `fi`), trimmed
/// and lower-cased: 3–32 characters of `a-z`, `0-9`, `_`, `-`, `.`.
pub fn username(value: &str) -> Result<String, ApiError> {
    let name = value.nfkc().collect::<String>().trim().to_lowercase();
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

/// Fewest different characters a new password must use.
pub const PASSWORD_MIN_DISTINCT_CHARS: usize = 5;
/// Most digits and symbols [`password`] strips from either end of a password
/// before it looks the rest up among the common passwords (`monkey2024!`).
const PASSWORD_AFFIX_MAX_CHARS: usize = 5;
/// Fewest characters a password must have besides the username it contains.
const PASSWORD_BEYOND_USERNAME_MIN_CHARS: usize = 4;

/// Common passwords, lower-case, one a line: the most used ones of public breach
/// corpora and the words and keyboard walks they are made of. Shipped in the binary.
const COMMON_PASSWORDS: &str = include_str!("common_passwords.txt");

fn common_passwords() -> &'static HashSet<&'static str> {
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_PASSWORDS
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect()
    })
}

/// A new password of the account `username`: 8–256 characters, taken as is
/// (never trimmed), and not easy to guess: not only spaces, at least
/// [`PASSWORD_MIN_DISTINCT_CHARS`] different characters, not a run like
/// `abcdefgh` or `98765432`, not a common password (case-insensitive, also with
/// a few digits or symbols added at either end), and not the username with a few
/// characters added.
pub fn password(value: &str, username: &str) -> Result<(), ApiError> {
    char_len("password", value, PASSWORD_MIN_CHARS, PASSWORD_MAX_CHARS)?;
    let weak = |why: &str| {
        Err(ApiError::invalid(format!(
            "password is too easy to guess: {why}; a few unrelated words make a strong one"
        )))
    };
    if value.trim().is_empty() {
        return weak("it is only spaces");
    }
    let distinct: HashSet<char> = value.chars().collect();
    if distinct.len() < PASSWORD_MIN_DISTINCT_CHARS {
        return weak(&format!(
            "it must use at least {PASSWORD_MIN_DISTINCT_CHARS} different characters"
        ));
    }
    let lower = value.to_lowercase();
    if is_sequence(&lower) {
        return weak("it is a simple sequence");
    }
    let common = common_passwords();
    if common.contains(lower.as_str()) {
        return weak("it is one of the most common passwords");
    }
    let core = strip_affixes(&lower);
    if core.chars().count() >= 4 && common.contains(core) {
        return weak("it is a common password with a few characters added");
    }
    if !username.is_empty() && lower.contains(username) {
        let rest = lower.chars().count() - username.chars().count();
        let without = lower.replacen(username, "", 1);
        if rest < PASSWORD_BEYOND_USERNAME_MIN_CHARS || strip_affixes(&without).is_empty() {
            return weak("it is the username with a few characters added");
        }
    }
    Ok(())
}

/// Whether every character follows the previous one up or down by one (`abcd`, `4321`).
fn is_sequence(value: &str) -> bool {
    let codes: Vec<i64> = value.chars().map(|c| i64::from(u32::from(c))).collect();
    let Some(step) = codes.windows(2).next().map(|w| w[1] - w[0]) else {
        return false;
    };
    step.abs() == 1 && codes.windows(2).all(|w| w[1] - w[0] == step)
}

/// `value` without up to [`PASSWORD_AFFIX_MAX_CHARS`] ASCII digits and symbols at
/// each end.
fn strip_affixes(value: &str) -> &str {
    let affix = |c: char| c.is_ascii_digit() || c.is_ascii_punctuation() || c == ' ';
    let mut core = value;
    for _ in 0..PASSWORD_AFFIX_MAX_CHARS {
        match core.strip_suffix(affix) {
            Some(rest) => core = rest,
            None => break,
        }
    }
    for _ in 0..PASSWORD_AFFIX_MAX_CHARS {
        match core.strip_prefix(affix) {
            Some(rest) => core = rest,
            None => break,
        }
    }
    core
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

/// A display name: trimmed, 1–64 characters, one line, no invisible formatting.
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
        assert_eq!(message(password("", "alice")), "password is required");
        assert_eq!(
            message(password("short", "alice")),
            "password must be at least 8 characters"
        );
        // Eight characters, sixteen bytes.
        assert!(password("éàèùâêîô", "alice").is_ok());
        assert!(password("éàèùâêî", "alice").is_err());
        assert_eq!(
            message(password(&"xy3#z".repeat(52), "alice")),
            "password must be at most 256 characters"
        );
    }

    #[test]
    fn weak_passwords_are_refused() {
        for weak in [
            "12345678",
            "password",
            "PassWord",
            "        ",
            "\t\t\t\t\t\t\t\t",
            "aaaaaaaaaaaa",
            "abababababab",
            "abcdefghij",
            "98765432",
            "qwertyuiop",
            "iloveyou",
            "password123!",
            "!!monkey2024",
            "Dragon1234",
            "alice2024",
            "alice12!",
        ] {
            let refused = message(password(weak, "alice"));
            assert!(
                refused.starts_with("password is too easy to guess"),
                "{weak:?}: {refused}"
            );
        }
        for strong in [
            "correct horse battery staple",
            "tulip-gravel-orbit",
            "alice and the walrus",
            "N0t-in-any-l1st",
            "zebra crossing at noon",
        ] {
            assert!(password(strong, "alice").is_ok(), "{strong:?}");
        }
    }

    #[test]
    fn the_common_password_list_is_lower_case_and_large() {
        let list = common_passwords();
        assert!(list.len() >= 2_000, "{} entries", list.len());
        for entry in list {
            assert_eq!(*entry, entry.to_lowercase(), "{entry:?}");
        }
    }

    #[test]
    fn usernames_are_nfkc_normalised() {
        assert_eq!(username("ＡＬＩＣＥ").expect("valid"), "alice");
        assert_eq!(username("ﬁona").expect("valid"), "fiona");
        assert!(message(username("al\u{200B}ice")).contains("may only contain"));
    }

    #[test]
    fn format_characters_are_refused_in_names_and_text() {
        for bad in [
            "evil\u{202E}gnp.exe",
            "zero\u{200B}width",
            "soft\u{AD}hyphen",
            "\u{FEFF}bom",
            "iso\u{2066}late\u{2069}",
            "a\u{200D}b",
            "a\u{200C}b",
            "lonely tag \u{E0067}",
        ] {
            let refused = message(display_name(bad));
            assert!(
                refused.contains("invisible formatting"),
                "{bad:?}: {refused}"
            );
            assert!(single_line("title", bad).is_err(), "{bad:?}");
            assert!(multi_line("bio", bad).is_err(), "{bad:?}");
        }
        for good in [
            "Zoë 🎉",
            "👩\u{200D}💻 coder",
            "👨\u{200D}👩\u{200D}👧",
            "\u{1F3F4}\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F} Scot",
            // Persian "mi-khaham" with its zero-width non-joiner.
            "\u{0645}\u{06CC}\u{200C}\u{062E}\u{0648}\u{0627}\u{0647}\u{0645}",
            // Devanagari "ksha" half form: KA, VIRAMA, ZWJ, SSA.
            "\u{0915}\u{094D}\u{200D}\u{0937}",
        ] {
            assert!(display_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn multi_line_text_allows_newlines_but_not_escapes() {
        assert!(multi_line("bio", "line one\nline two\r\n\tindented").is_ok());
        for bad in ["bell\u{7}", "esc\u{1B}[31mred", "nul\u{0}", "del\u{7F}"] {
            let refused = message(multi_line("bio", bad));
            assert!(
                refused.starts_with("bio must not contain control"),
                "{refused}"
            );
        }
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
