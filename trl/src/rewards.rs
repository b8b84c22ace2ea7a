//! Reward functions over completion text that GRPO (and evaluation) share: the final answer
//! of a completion, its accuracy against a reference, its format, its length.

use regex::Regex;

/// The final answer a completion gives, in the first of these forms it has: after GSM8K's
/// `#### ` marker (the rest of that line), inside the last `\boxed{...}` (braces balanced),
/// or the last number in the text. `None` when it has none of them.
pub fn extract_answer(text: &str) -> Option<String> {
    if let Some(at) = text.rfind("####") {
        let line = text[at + 4..].lines().next().unwrap_or("").trim();
        if !line.is_empty() {
            return Some(line.to_string());
        }
    }
    if let Some(boxed) = last_boxed(text) {
        return Some(boxed);
    }
    last_number(text)
}

/// The content of the last `\boxed{...}`, its braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

fn number_pattern() -> &'static Regex {
    static NUMBER: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    NUMBER.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid pattern"))
}

fn last_number(text: &str) -> Option<String> {
    number_pattern().find_iter(text).last().map(|m| m.as_str().to_string())
}

/// An answer as it is compared: numbers by value (`1,000`, `1000.0` and `$1000` are equal),
/// anything else by its text without surrounding spaces, `$` signs and a final period.
fn normalize(answer: &str) -> String {
    let s = answer.trim().trim_end_matches('.').replace(['$', ','], "");
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => format!("{v}"),
        _ => s.to_string(),
    }
}

/// 1.0 when the completion's final answer ([`extract_answer`]) equals the reference answer
/// (itself read with [`extract_answer`] when it has a `####` marker or a `\boxed{}`, as GSM8K's
/// and MATH's reference solutions do), else 0.0.
pub fn accuracy(completion: &str, reference: &str) -> f32 {
    match extract_answer(completion) {
        Some(answer) if same_answer(&answer, reference) => 1.0,
        _ => 0.0,
    }
}

/// Whether an answer already extracted (by a pattern, say) equals the reference answer (read
/// with [`extract_answer`] when it has a `####` marker or a `\boxed{}`), numbers by value.
pub fn same_answer(answer: &str, reference: &str) -> bool {
    let reference = if reference.contains("####") || reference.contains("\\boxed{") {
        extract_answer(reference).unwrap_or_default()
    } else {
        reference.to_string()
    };
    normalize(answer) == normalize(&reference)
}

/// 1.0 when `pattern` matches somewhere in the completion (anchor it with `^`/`$` to match
/// the whole text), else 0.0.
pub fn format(completion: &str, pattern: &Regex) -> f32 {
    pattern.is_match(completion) as u8 as f32
}

/// Minus `penalty` per completion token beyond `target` (0 up to it).
pub fn length(tokens: usize, target: usize, penalty: f32) -> f32 {
    -(tokens.saturating_sub(target) as f32) * penalty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_found_in_each_form() {
        assert_eq!(extract_answer("34 + 47 = 81.\n#### 81").as_deref(), Some("81"));
        assert_eq!(extract_answer("so \\boxed{\\frac{1}{2}} it is").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(extract_answer("first 3, then 1,250.5 apples").as_deref(), Some("1,250.5"));
        assert_eq!(extract_answer("no answer here"), None);
        assert_eq!(extract_answer("#### \n"), None); // an empty marker is no answer
    }

    #[test]
    fn accuracy_compares_numbers_by_value() {
        assert_eq!(accuracy("#### 1,000", "1000"), 1.0);
        assert_eq!(accuracy("The answer is $1000.", "#### 1000"), 1.0);
        assert_eq!(accuracy("#### 81", "The sum is 81.\n#### 81"), 1.0);
        assert_eq!(accuracy("#### 80", "81"), 0.0);
        assert_eq!(accuracy("nothing", "81"), 0.0);
        assert_eq!(accuracy("\\boxed{x+1}", "\\boxed{x+1}"), 1.0);
    }

    /// The hand-made cases evaluation users hit: negative numbers, several markers (the last
    /// counts), thousands separators, unicode around the answer, decimals.
    #[test]
    fn exact_match_edge_cases() {
        assert_eq!(accuracy("3 - 8 = -5\n#### -5", "#### -5"), 1.0);
        assert_eq!(accuracy("#### -5", "5"), 0.0);
        assert_eq!(accuracy("#### 3\nno wait\n#### 4", "4"), 1.0, "the last marker counts");
        assert_eq!(accuracy("#### 3\nno wait\n#### 4", "3"), 0.0);
        assert_eq!(accuracy("Réponse : 12 345 → #### 12,345", "12345"), 1.0);
        assert_eq!(accuracy("答えは 42 です", "42"), 1.0, "the last number, whatever the script around it");
        assert_eq!(accuracy("#### 0.50", "0.5"), 1.0);
        assert_eq!(accuracy("#### Paris.", "paris"), 0.0, "text is compared as written");
        assert_eq!(accuracy("#### Paris.", "Paris"), 1.0);
    }

    #[test]
    fn extracted_answers_compare_as_text_or_number() {
        assert!(same_answer("B", "B") && !same_answer("B", "C"));
        assert!(same_answer("1,000", "#### 1000"));
        assert!(same_answer("Paris", "Paris."));
    }

    #[test]
    fn format_and_length() {
        let p = Regex::new(r"^.*\n#### -?\d+$").unwrap();
        assert_eq!(format("34 + 47 = 81.\n#### 81", &p), 1.0);
        assert_eq!(format("81", &p), 0.0);
        assert_eq!(length(10, 16, 0.5), 0.0);
        assert_eq!(length(20, 16, 0.5), -2.0);
    }
}
