//! Environment keys: the `{key}` of every route, which becomes one NATS subject token.

use thiserror::Error;

/// Longer keys are refused: Flagsmith's client-side keys are 22 characters, and a cap keeps
/// a hostile client from making the hub hold arbitrarily large map keys.
pub const MAX_KEY_LEN: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("environment key is empty")]
    Empty,
    #[error("environment key is longer than {MAX_KEY_LEN} characters")]
    TooLong,
    #[error(
        "environment key may contain only ASCII letters, digits, '-' and '_' \
         (it becomes a NATS subject token)"
    )]
    BadCharacter,
}

/// Checks that `key` is safe as a single NATS subject token. Only `[A-Za-z0-9_-]` passes:
/// that covers every key Flagsmith generates and excludes `.`, `*`, `>`, whitespace,
/// control characters, non-ASCII and percent-escapes, which would change the subject's
/// meaning or its encoding on the wire.
pub fn validate_key(key: &str) -> Result<&str, KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    if key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(key)
    } else {
        Err(KeyError::BadCharacter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_flagsmith_keys() {
        for key in ["load_test", "n9fbf9h3v4fFgH3U3ngWhb", "a", "A-b_9"] {
            assert_eq!(validate_key(key), Ok(key));
        }
        let longest = "k".repeat(MAX_KEY_LEN);
        assert!(validate_key(&longest).is_ok());
    }

    #[test]
    fn rejects_what_would_change_the_subject() {
        assert_eq!(validate_key(""), Err(KeyError::Empty));
        assert_eq!(
            validate_key(&"k".repeat(MAX_KEY_LEN + 1)),
            Err(KeyError::TooLong)
        );
        for key in [
            "a.b", "*", ">", "a b", "a\tb", "a\nb", "a\0b", "\u{7f}", "é", "a%2Eb", "a/b", "ключ",
        ] {
            assert_eq!(validate_key(key), Err(KeyError::BadCharacter), "{key:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn accepts_exactly_short_runs_of_safe_characters(key in ".{0,140}") {
            let safe = !key.is_empty()
                && key.len() <= MAX_KEY_LEN
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            prop_assert_eq!(validate_key(&key).is_ok(), safe, "{:?}", key);
        }

        /// Keys drawn from safe characters mixed with every kind NATS gives a meaning to
        /// (token separator, wildcards, white space, control, non-ASCII): whatever the
        /// check accepts is exactly one NATS subject token.
        #[test]
        fn accepted_keys_are_one_nats_token(key in "[A-Za-z0-9_.*> \t\r\n\x00\x7f%é-]{1,40}") {
            if validate_key(&key).is_ok() {
                prop_assert!(key.is_ascii(), "{:?}", key);
                prop_assert!(
                    !key.contains(['.', '*', '>', ' ', '\t', '\r', '\n', '\0', '\x7f', '%']),
                    "{:?}", key
                );
            }
        }
    }
}
