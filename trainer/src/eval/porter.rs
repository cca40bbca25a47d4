//! The Porter stemmer as NLTK runs it by default (`PorterStemmer()`, NLTK_EXTENSIONS mode),
//! which Google's rouge-score applies with `use_stemmer=True`. Written from the algorithm
//! (Porter 1980) plus NLTK's documented departures: irregular forms, `ies`/`ied` on 4-letter
//! words, a stricter y -> i, `alli`/`fulli`/`logi` in step 2 and 2-letter cvc stems. Checked
//! word by word against NLTK in `tests`. Words are ASCII here: rouge's tokenizer keeps [a-z0-9].

/// NLTK's irregular forms, looked up before any rule.
const IRREGULAR: &[(&str, &str)] = &[
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// The stem of a lower-case ASCII word.
pub fn stem(word: &str) -> String {
    if let Some((_, s)) = IRREGULAR.iter().find(|(w, _)| *w == word) {
        return (*s).to_string();
    }
    if word.len() <= 2 || !word.is_ascii() {
        return word.to_string();
    }
    let mut w = word.as_bytes().to_vec();
    step1a(&mut w);
    step1b(&mut w);
    step1c(&mut w);
    step2(&mut w);
    step3(&mut w);
    step4(&mut w);
    step5a(&mut w);
    step5b(&mut w);
    // cannot fail: only ASCII words reach the steps, which write ASCII letters.
    String::from_utf8(w).expect("ASCII in, ASCII out")
}

fn is_vowel(c: u8) -> bool {
    matches!(c, b'a' | b'e' | b'i' | b'o' | b'u')
}

/// Consonant flags: `y` is a consonant at the start or after a vowel.
fn consonants(w: &[u8]) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, &c) in w.iter().enumerate() {
        let f = if is_vowel(c) {
            false
        } else if c == b'y' {
            i == 0 || !flags[i - 1]
        } else {
            true
        };
        flags.push(f);
    }
    flags
}

fn is_consonant(w: &[u8], i: usize) -> bool {
    consonants(&w[..=i])[i]
}

/// m in [C](VC)^m[V]: the number of vowel-to-consonant transitions.
fn measure(w: &[u8]) -> usize {
    consonants(w).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(w: &[u8]) -> bool {
    consonants(w).iter().any(|c| !c)
}

fn ends_double_consonant(w: &[u8]) -> bool {
    let n = w.len();
    n >= 2 && w[n - 1] == w[n - 2] && is_consonant(w, n - 1)
}

/// *o: ends consonant-vowel-consonant, the last not w, x or y (or, in NLTK, a 2-letter vc).
fn ends_cvc(w: &[u8]) -> bool {
    let n = w.len();
    let f = consonants(w);
    (n >= 3 && f[n - 3] && !f[n - 2] && f[n - 1] && !matches!(w[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !f[0] && f[1])
}

/// A rule's condition on the stem left after its suffix is cut.
type Cond = fn(&[u8]) -> bool;

fn m_gt0(s: &[u8]) -> bool {
    measure(s) > 0
}

fn m_gt1(s: &[u8]) -> bool {
    measure(s) > 1
}

/// The first rule whose suffix matches decides: its replacement if the condition holds,
/// else the word unchanged (later rules are not tried).
fn apply_rules(w: &mut Vec<u8>, rules: &[(&str, &str, Option<Cond>)]) -> bool {
    for &(suffix, repl, cond) in rules {
        if w.ends_with(suffix.as_bytes()) {
            let stem_len = w.len() - suffix.len();
            if cond.is_none_or(|c| c(&w[..stem_len])) {
                w.truncate(stem_len);
                w.extend_from_slice(repl.as_bytes());
                return true;
            }
            return false;
        }
    }
    false
}

fn replace_suffix(w: &mut Vec<u8>, suffix: &str, repl: &str) {
    w.truncate(w.len() - suffix.len());
    w.extend_from_slice(repl.as_bytes());
}

fn step1a(w: &mut Vec<u8>) {
    if w.ends_with(b"ies") && w.len() == 4 {
        replace_suffix(w, "ies", "ie");
        return;
    }
    apply_rules(
        w,
        &[
            ("sses", "ss", None),
            ("ies", "i", None),
            ("ss", "ss", None),
            ("s", "", None),
        ],
    );
}

fn step1b(w: &mut Vec<u8>) {
    if w.ends_with(b"ied") {
        let repl = if w.len() == 4 { "ie" } else { "i" };
        replace_suffix(w, "ied", repl);
        return;
    }
    if w.ends_with(b"eed") {
        if measure(&w[..w.len() - 3]) > 0 {
            w.pop();
        }
        return;
    }
    let Some(cut) = ["ed", "ing"]
        .iter()
        .find(|s| w.ends_with(s.as_bytes()) && contains_vowel(&w[..w.len() - s.len()]))
    else {
        return;
    };
    w.truncate(w.len() - cut.len());
    if apply_rules(
        w,
        &[
            ("at", "ate", None),
            ("bl", "ble", None),
            ("iz", "ize", None),
        ],
    ) {
        return;
    }
    if ends_double_consonant(w) {
        // A double consonant is undoubled unless it is l, s or z; either way no `e` is added.
        if !matches!(w[w.len() - 1], b'l' | b's' | b'z') {
            w.pop();
        }
        return;
    }
    if measure(w) == 1 && ends_cvc(w) {
        w.push(b'e');
    }
}

fn step1c(w: &mut [u8]) {
    // y -> i only after a consonant, and not when that consonant is the whole stem.
    let n = w.len();
    if n >= 3 && w[n - 1] == b'y' && is_consonant(w, n - 2) {
        w[n - 1] = b'i';
    }
}

fn step2(w: &mut Vec<u8>) {
    if w.ends_with(b"alli") && m_gt0(&w[..w.len() - 4]) {
        replace_suffix(w, "alli", "al");
        return step2(w);
    }
    if w.ends_with(b"logi") {
        // No other step-2 suffix ends in `logi`. NLTK tests the word without `ogi`: the stem
        // keeps its `l`.
        if m_gt0(&w[..w.len() - 3]) {
            w.pop();
        }
        return;
    }
    apply_rules(w, STEP2);
}

const STEP2: &[(&str, &str, Option<Cond>)] = &[
    ("ational", "ate", Some(m_gt0)),
    ("tional", "tion", Some(m_gt0)),
    ("enci", "ence", Some(m_gt0)),
    ("anci", "ance", Some(m_gt0)),
    ("izer", "ize", Some(m_gt0)),
    ("bli", "ble", Some(m_gt0)),
    ("alli", "al", Some(m_gt0)),
    ("entli", "ent", Some(m_gt0)),
    ("eli", "e", Some(m_gt0)),
    ("ousli", "ous", Some(m_gt0)),
    ("ization", "ize", Some(m_gt0)),
    ("ation", "ate", Some(m_gt0)),
    ("ator", "ate", Some(m_gt0)),
    ("alism", "al", Some(m_gt0)),
    ("iveness", "ive", Some(m_gt0)),
    ("fulness", "ful", Some(m_gt0)),
    ("ousness", "ous", Some(m_gt0)),
    ("aliti", "al", Some(m_gt0)),
    ("iviti", "ive", Some(m_gt0)),
    ("biliti", "ble", Some(m_gt0)),
    ("fulli", "ful", Some(m_gt0)),
];

fn step3(w: &mut Vec<u8>) {
    apply_rules(
        w,
        &[
            ("icate", "ic", Some(m_gt0)),
            ("ative", "", Some(m_gt0)),
            ("alize", "al", Some(m_gt0)),
            ("iciti", "ic", Some(m_gt0)),
            ("ical", "ic", Some(m_gt0)),
            ("ful", "", Some(m_gt0)),
            ("ness", "", Some(m_gt0)),
        ],
    );
}

fn step4(w: &mut Vec<u8>) {
    fn ion(s: &[u8]) -> bool {
        m_gt1(s) && matches!(s.last(), Some(b's' | b't'))
    }
    apply_rules(
        w,
        &[
            ("al", "", Some(m_gt1)),
            ("ance", "", Some(m_gt1)),
            ("ence", "", Some(m_gt1)),
            ("er", "", Some(m_gt1)),
            ("ic", "", Some(m_gt1)),
            ("able", "", Some(m_gt1)),
            ("ible", "", Some(m_gt1)),
            ("ant", "", Some(m_gt1)),
            ("ement", "", Some(m_gt1)),
            ("ment", "", Some(m_gt1)),
            ("ent", "", Some(m_gt1)),
            ("ion", "", Some(ion)),
            ("ou", "", Some(m_gt1)),
            ("ism", "", Some(m_gt1)),
            ("ate", "", Some(m_gt1)),
            ("iti", "", Some(m_gt1)),
            ("ous", "", Some(m_gt1)),
            ("ive", "", Some(m_gt1)),
            ("ize", "", Some(m_gt1)),
        ],
    );
}

fn step5a(w: &mut Vec<u8>) {
    if w.last() == Some(&b'e') {
        let s = &w[..w.len() - 1];
        let m = measure(s);
        if m > 1 || (m == 1 && !ends_cvc(s)) {
            w.pop();
        }
    }
}

fn step5b(w: &mut Vec<u8>) {
    if w.ends_with(b"ll") && measure(&w[..w.len() - 1]) > 1 {
        w.pop();
    }
}
