//! DiffSynth's prompt cleaning before Wan's umT5 tokenizer, so that flowstep tokenizes a prompt
//! as `prepare` and DiffSynth do: `whitespace_clean(basic_clean(text))` of
//! `diffsynth/models/wan_video_text_encoder.py`, where `basic_clean` is `ftfy.fix_text`, then
//! `html.unescape` twice, then `strip`. Curly quotes become straight ones, fullwidth letters and
//! punctuation ASCII, Latin ligatures letters, HTML entities characters; control characters and
//! terminal escapes go; the text is NFC-normalised.
//!
//! The one part of `ftfy.fix_text` not ported is `fix_encoding`, its mojibake repair (text that
//! was decoded in the wrong encoding, such as "sÃ³" for "só"): that rests on ftfy's statistical
//! badness heuristics. A prompt with such mojibake is tokenized unrepaired here.
//!
//! The character tables (`prompt_clean/tables.json`) are read from the pinned ftfy and Python by
//! `scripts/prompt_clean_tables.py`; export/tests/test_prompt_clean.py checks this port against
//! DiffSynth's own functions on every HTML entity and a corpus of prompts.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde::{Deserialize, Deserializer};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// The tables, as scripts/prompt_clean_tables.py writes them (code points as numbers).
#[derive(Deserialize)]
struct Tables {
    /// html.entities.html5: "amp;" and "amp" (the names HTML lets go without ';').
    html5: HashMap<String, String>,
    invalid_charrefs: HashMap<u32, String>,
    invalid_codepoints: HashSet<u32>,
    /// ftfy's entities: "&amp;", and upper-case forms such as "&EACUTE;".
    ftfy_html_entities: HashMap<String, String>,
    /// C1 controls as Windows-1252, ligatures, widths: one character to its replacement.
    #[serde(deserialize_with = "char_map")]
    c1: HashMap<char, String>,
    #[serde(deserialize_with = "char_map")]
    ligatures: HashMap<char, String>,
    #[serde(deserialize_with = "char_map")]
    width: HashMap<char, String>,
    #[serde(deserialize_with = "char_set")]
    single_quotes: HashSet<char>,
    #[serde(deserialize_with = "char_set")]
    double_quotes: HashSet<char>,
    #[serde(deserialize_with = "char_set")]
    control: HashSet<char>,
    #[serde(deserialize_with = "char_set")]
    decimal_digits: HashSet<char>,
    #[serde(deserialize_with = "char_set")]
    whitespace: HashSet<char>,
}

fn character<E: serde::de::Error>(code: u32) -> std::result::Result<char, E> {
    char::from_u32(code).ok_or_else(|| E::custom(format!("{code} is not a Unicode scalar value")))
}

fn char_set<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<HashSet<char>, D::Error> {
    Vec::<u32>::deserialize(d)?.into_iter().map(character).collect()
}

fn char_map<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<HashMap<char, String>, D::Error> {
    HashMap::<u32, String>::deserialize(d)?.into_iter().map(|(k, v)| Ok((character(k)?, v))).collect()
}

/// The tables built into flowstep (parsed once); an error only for a build whose tables.json
/// does not parse.
fn tables() -> Result<&'static Tables> {
    static TABLES: OnceLock<std::result::Result<Tables, String>> = OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        serde_json::from_str(include_str!("prompt_clean/tables.json"))
            .map_err(|e| format!("the prompt-cleaning tables built into flowstep (src/prompt_clean/tables.json) do not parse: {e}"))
    });
    tables.as_ref().map_err(|e| Error::Config(e.clone()))
}

/// `whitespace_clean(basic_clean(text))`: what DiffSynth's `HuggingfaceTokenizer(clean="whitespace")`
/// hands the tokenizer.
pub fn clean(text: &str) -> Result<String> {
    let t = tables()?;
    let fixed = fix_text(t, text);
    let unescaped = html_unescape(t, &html_unescape(t, &fixed));
    // whitespace_clean after strip: runs of Python's \s become one space, ends trimmed.
    Ok(unescaped.split(|c| t.whitespace.contains(&c)).filter(|word| !word.is_empty()).collect::<Vec<_>>().join(" "))
}

/// `ftfy.fix_text` with its default configuration, less `fix_encoding`: line by line (each
/// segment keeps its "\n"); once a line holds '<', HTML is no longer unescaped in it or in any
/// later line (ftfy keeps the changed configuration for the rest of the text).
fn fix_text(t: &Tables, text: &str) -> String {
    let mut unescape = true;
    let mut out = String::with_capacity(text.len());
    for segment in text.split_inclusive('\n') {
        unescape &= !segment.contains('<');
        out.push_str(&fix_segment(t, segment, unescape));
    }
    out
}

/// `ftfy.fix_and_explain`: the fixers in ftfy's order, then NFC, until nothing changes.
fn fix_segment(t: &Tables, segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let before = text.clone();
        if unescape {
            text = ftfy_unescape_html(t, &text);
        }
        text = translate(&text, |c| t.c1.get(&c).map(String::as_str));
        text = translate(&text, |c| t.ligatures.get(&c).map(String::as_str));
        text = translate(&text, |c| t.width.get(&c).map(String::as_str));
        text = translate(&text, |c| t.double_quotes.contains(&c).then_some("\""));
        text = translate(&text, |c| t.single_quotes.contains(&c).then_some("'"));
        text = text.replace("\r\n", "\n");
        text = translate(&text, |c| matches!(c, '\r' | '\u{2028}' | '\u{2029}' | '\u{85}').then_some("\n"));
        text = remove_terminal_escapes(t, &text);
        text = translate(&text, |c| t.control.contains(&c).then_some(""));
        text = text.nfc().collect();
        if text == before {
            return text;
        }
    }
}

/// `str.translate`: each character the map knows is replaced by its string.
fn translate<'a>(text: &str, map: impl Fn(char) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match map(c) {
            Some(s) => out.push_str(s),
            None => out.push(c),
        }
    }
    out
}

/// `re.sub` over characters: at each position `matcher` gives the replacement and the number of
/// characters it replaces (at least one), or None to keep the character there.
fn substitute(text: &str, matcher: impl Fn(&[char], usize) -> Option<(String, usize)>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        match matcher(&chars, i) {
            Some((replacement, len)) => {
                out.push_str(&replacement);
                i += len.max(1);
            }
            None => {
                out.push(chars[i]);
                i += 1;
            }
        }
    }
    out
}

/// ftfy's `remove_terminal_escapes`: "\x1b[" + Python digits or ';' + one ASCII letter, removed.
fn remove_terminal_escapes(t: &Tables, text: &str) -> String {
    substitute(text, |chars, i| {
        if chars[i] != '\u{1b}' || chars.get(i + 1) != Some(&'[') {
            return None;
        }
        let mut j = i + 2;
        while j < chars.len() && (chars[j] == ';' || t.decimal_digits.contains(&chars[j])) {
            j += 1;
        }
        chars.get(j).is_some_and(char::is_ascii_alphabetic).then(|| (String::new(), j + 1 - i))
    })
}

/// ftfy's `unescape_html`: each `&#?[0-9A-Za-z]{1,24};` that is one of its entities, or a
/// numeric reference html.unescape decodes whole.
fn ftfy_unescape_html(t: &Tables, text: &str) -> String {
    substitute(text, |chars, i| {
        if chars[i] != '&' {
            return None;
        }
        let start = i + 1 + usize::from(chars.get(i + 1) == Some(&'#'));
        let mut end = start;
        while end < chars.len() && end - start < 24 && chars[end].is_ascii_alphanumeric() {
            end += 1;
        }
        if end == start || chars.get(end) != Some(&';') {
            return None;
        }
        let entity: String = chars[i..=end].iter().collect();
        let value = match t.ftfy_html_entities.get(&entity) {
            Some(value) => value.clone(),
            None if entity.starts_with("&#") => Some(html_unescape(t, &entity)).filter(|u| !u.contains(';'))?,
            None => return None,
        };
        Some((value, end + 1 - i))
    })
}

/// Python's `html.unescape`: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)` replaced
/// by the character it names (the longest known prefix for names, as HTML5 says).
fn html_unescape(t: &Tables, text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    substitute(text, |chars, i| {
        let (reference, len) = if chars[i] == '&' { charref(&chars[i + 1..])? } else { return None };
        Some((replace_charref(t, &reference), 1 + len))
    })
}

/// The reference after a '&' (without it) and its length in characters, as the regex matches it.
fn charref(rest: &[char]) -> Option<(String, usize)> {
    let take = |from: usize, ok: &dyn Fn(char) -> bool, max: usize| {
        let mut end = from;
        while end < rest.len() && end - from < max && ok(rest[end]) {
            end += 1;
        }
        end
    };
    let end = match rest.first()? {
        '#' => match rest.get(1)? {
            'x' | 'X' => take(2, &|c| c.is_ascii_hexdigit(), usize::MAX).max(2),
            _ => take(1, &|c| c.is_ascii_digit(), usize::MAX),
        },
        _ => take(0, &|c| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'), 32),
    };
    let digits_from = match (rest[0], rest.get(1)) {
        ('#', Some('x' | 'X')) => 2,
        ('#', _) => 1,
        _ => 0,
    };
    if end == digits_from {
        return None;
    }
    let end = end + usize::from(rest.get(end) == Some(&';'));
    Some((rest[..end].iter().collect(), end))
}

fn replace_charref(t: &Tables, s: &str) -> String {
    if let Some(number) = s.strip_prefix('#') {
        let number = number.trim_end_matches(';');
        let (digits, radix) = match number.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (number, 10),
        };
        let digits = digits.trim_start_matches('0');
        let code = match u32::from_str_radix(if digits.is_empty() { "0" } else { digits }, radix) {
            Ok(code) => code,
            Err(_) => return "\u{fffd}".to_string(), // past u32, so past 0x10FFFF
        };
        if let Some(replacement) = t.invalid_charrefs.get(&code) {
            return replacement.clone();
        }
        if (0xD800..=0xDFFF).contains(&code) || code > 0x10FFFF {
            return "\u{fffd}".to_string();
        }
        if t.invalid_codepoints.contains(&code) {
            return String::new();
        }
        return char::from_u32(code).map_or_else(|| "\u{fffd}".to_string(), String::from);
    }
    if let Some(value) = t.html5.get(s) {
        return value.clone();
    }
    let chars: Vec<char> = s.chars().collect();
    for x in (2..chars.len()).rev() {
        let prefix: String = chars[..x].iter().collect();
        if let Some(value) = t.html5.get(&prefix) {
            return value.clone() + &chars[x..].iter().collect::<String>();
        }
    }
    format!("&{s}")
}

#[cfg(test)]
mod tests {
    use super::clean as clean_or_error;

    fn clean(text: &str) -> String {
        clean_or_error(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A few cases by hand (ftfy's and Python's own documented examples); the full comparison
    /// with DiffSynth's functions is export/tests/test_prompt_clean.py.
    #[test]
    fn cleans_as_diffsynth_does() {
        assert_eq!(clean("  a\tred \n\n ball  "), "a red ball");
        assert_eq!(clean("it’s a “fox”"), "it's a \"fox\"");
        assert_eq!(clean("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(clean("ﬂubberiﬁc"), "flubberific");
        assert_eq!(clean("P&EACUTE;REZ &amp;amp; &lt;b&gt; &#x2019;"), "PÉREZ & <b> '");
        assert_eq!(clean("色调艳丽，过曝"), "色调艳丽,过曝");
        assert_eq!(clean("cafe\u{301}"), "café");
        assert_eq!(clean("\u{1b}[31mred\u{1b}[0m\u{0}"), "red");
        assert_eq!(clean("&ampfoo &notit; &#0; &#x110000; &#128;"), "&foo ¬it; \u{fffd} \u{fffd} €");
    }
}
