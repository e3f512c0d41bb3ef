//! The built-in corpus: English-like documents generated on the fly from a seed, so the quick
//! start needs no download, with a difficulty label on every byte as ground truth for the
//! depth-versus-difficulty analysis (spec §7: "depth follows next-token predictability").
//!
//! A document is a story: an introduction that names a hero ("There once was a brave fox
//! named Mira."), then sentences drawn from a small grammar with subject-verb agreement
//! (determiners, nouns, verbs, adjectives, adverbs, names, places), mixed with spans whose
//! next bytes need computation:
//!
//! - arithmetic, `Tom wrote 12 + 7 = 19.` (also `-` with a non-negative result and `*` on
//!   small numbers);
//! - bracket matching, `Ada drew ( [ { } ] ) on the wall.`, where each closer must match the
//!   innermost open bracket;
//! - copying, `That is the story of Mira.`, where the name after a copy cue is always the hero
//!   introduced in the first sentence;
//! - sorting, `Ben sorted 42 7 19 into 7 19 42.`
//!
//! Labels ([`EASY`], [`CONTENT`], [`COMPUTED`]): grammar glue (determiners, prepositions,
//! copulas, fixed phrases, spaces, punctuation, operators) is easy; freely chosen words and
//! numbers are content; the result digits, the closers, the copied hero name and the sorted
//! output are computed. [`label_tokens`] turns byte labels into token labels.
//!
//! Every document is generated from its own stream `Rng::derive(seed, "builtin/doc/<i>")`, so
//! document `i` does not depend on how many documents are asked for.

use super::tasks::{McTask, McTaskSet};
use mor_core::rng::Rng;

/// Label of predictable grammar glue: determiners, prepositions, copulas, fixed phrases,
/// spaces, punctuation and operators.
pub const EASY: u8 = 0;
/// Label of freely chosen content: nouns, verbs, adjectives, adverbs, names, places, operands
/// and opening brackets.
pub const CONTENT: u8 = 1;
/// Label of computed bytes: arithmetic results, matching closers, copied names, sorted output.
pub const COMPUTED: u8 = 2;

/// The kind of a computed span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpanKind {
    /// `a op b = c`.
    Arithmetic,
    /// A balanced sequence of `( ) [ ] { }` separated by spaces.
    Brackets,
    /// The hero's name after a copy cue.
    Copy,
    /// `sorted x y z into ...`: the numbers and their sorted copy.
    Sort,
}

/// A computed span of a document: `start..end` is the byte range of the whole construct
/// (e.g. all of `12 + 7 = 19`), whose computed bytes carry [`COMPUTED`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// What the span computes.
    pub kind: SpanKind,
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// One generated document with a difficulty label per UTF-8 byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinDoc {
    /// The text (ASCII).
    pub text: String,
    /// One label per byte of `text`.
    pub labels: Vec<u8>,
    /// The computed spans, in order.
    pub spans: Vec<Span>,
}

/// The token labels of a tokenized text: each token gets the largest label of the bytes in its
/// range (so a token holding any computed byte is computed). Ranges are clamped to the text; an
/// empty range gets [`EASY`]. `doc_text` is only used for its length.
pub fn label_tokens(doc_text: &str, labels: &[u8], token_offsets: &[(usize, usize)]) -> Vec<u8> {
    let n = doc_text.len().min(labels.len());
    token_offsets
        .iter()
        .map(|&(s, e)| {
            let (s, e) = (s.min(n), e.min(n));
            labels[s..e.max(s)].iter().copied().max().unwrap_or(EASY)
        })
        .collect()
}

/// Generates `n` documents from `seed` (document `i` is the same for every `n > i`).
pub fn builtin_docs(seed: u64, n: usize) -> Vec<BuiltinDoc> {
    use rayon::prelude::*;
    (0..n)
        .into_par_iter()
        .map(|i| builtin_doc(seed, i))
        .collect()
}

/// Generates document `index` of the corpus of `seed`.
pub fn builtin_doc(seed: u64, index: usize) -> BuiltinDoc {
    let mut g = Gen::new(Rng::derive(seed, &format!("builtin/doc/{index}")));
    g.story();
    g.finish()
}

// ----------------------------------------------------------------------------------------
// Vocabulary.

/// Nouns as (singular, plural).
#[rustfmt::skip]
const NOUNS: &[(&str, &str)] = &[
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"), ("horse", "horses"),
    ("child", "children"), ("teacher", "teachers"), ("farmer", "farmers"), ("baker", "bakers"),
    ("sailor", "sailors"), ("doctor", "doctors"), ("student", "students"), ("king", "kings"),
    ("queen", "queens"), ("river", "rivers"), ("tree", "trees"), ("house", "houses"),
    ("box", "boxes"), ("city", "cities"), ("garden", "gardens"), ("book", "books"),
    ("letter", "letters"), ("boat", "boats"), ("road", "roads"), ("window", "windows"),
    ("apple", "apples"), ("stone", "stones"), ("lamp", "lamps"), ("song", "songs"),
    ("storm", "storms"), ("cloud", "clouds"), ("wolf", "wolves"), ("mouse", "mice"),
    ("friend", "friends"), ("painter", "painters"), ("clock", "clocks"), ("bridge", "bridges"),
    ("island", "islands"), ("owl", "owls"), ("ship", "ships"), ("hill", "hills"),
    ("village", "villages"), ("key", "keys"), ("door", "doors"), ("map", "maps"),
    ("candle", "candles"), ("basket", "baskets"), ("market", "markets"), ("engine", "engines"),
    ("robot", "robots"), ("dragon", "dragons"), ("rabbit", "rabbits"), ("forest", "forests"),
    ("coin", "coins"), ("shell", "shells"), ("flower", "flowers"), ("table", "tables"),
    ("chair", "chairs"), ("star", "stars"), ("lion", "lions"), ("goat", "goats"), ("bell", "bells"),
    ("drum", "drums"), ("cake", "cakes"),
];

/// Transitive verbs as (base, third person singular, past).
#[rustfmt::skip]
const VERBS_T: &[(&str, &str, &str)] = &[
    ("see", "sees", "saw"), ("find", "finds", "found"), ("carry", "carries", "carried"),
    ("open", "opens", "opened"), ("paint", "paints", "painted"), ("follow", "follows", "followed"),
    ("build", "builds", "built"), ("watch", "watches", "watched"), ("hold", "holds", "held"),
    ("push", "pushes", "pushed"), ("draw", "draws", "drew"), ("lift", "lifts", "lifted"),
    ("catch", "catches", "caught"), ("clean", "cleans", "cleaned"), ("count", "counts", "counted"),
    ("hide", "hides", "hid"), ("fix", "fixes", "fixed"), ("sell", "sells", "sold"),
    ("buy", "buys", "bought"), ("keep", "keeps", "kept"), ("visit", "visits", "visited"),
    ("chase", "chases", "chased"), ("greet", "greets", "greeted"), ("bring", "brings", "brought"),
    ("read", "reads", "read"), ("touch", "touches", "touched"), ("love", "loves", "loved"),
    ("help", "helps", "helped"), ("miss", "misses", "missed"), ("pull", "pulls", "pulled"),
    ("wash", "washes", "washed"), ("guard", "guards", "guarded"), ("feed", "feeds", "fed"),
    ("throw", "throws", "threw"), ("drop", "drops", "dropped"), ("meet", "meets", "met"),
];

/// Intransitive verbs as (base, third person singular, past).
#[rustfmt::skip]
const VERBS_I: &[(&str, &str, &str)] = &[
    ("run", "runs", "ran"), ("sleep", "sleeps", "slept"), ("wait", "waits", "waited"),
    ("smile", "smiles", "smiled"), ("sing", "sings", "sang"), ("dance", "dances", "danced"),
    ("laugh", "laughs", "laughed"), ("rest", "rests", "rested"), ("swim", "swims", "swam"),
    ("jump", "jumps", "jumped"), ("shine", "shines", "shone"), ("fall", "falls", "fell"),
    ("arrive", "arrives", "arrived"), ("travel", "travels", "traveled"),
    ("listen", "listens", "listened"), ("work", "works", "worked"), ("play", "plays", "played"),
    ("grow", "grows", "grew"), ("wander", "wanders", "wandered"),
    ("whisper", "whispers", "whispered"),
];

#[rustfmt::skip]
const ADJECTIVES: &[&str] = &[
    "small", "big", "old", "young", "red", "blue", "green", "quiet", "loud", "happy", "sad",
    "brave", "clever", "gentle", "tall", "short", "bright", "dark", "warm", "cold", "heavy",
    "light", "fast", "slow", "kind", "strange", "golden", "silver", "wooden", "ancient", "tiny",
    "huge", "busy", "lazy", "shy", "proud", "calm", "wild", "soft", "sharp", "empty", "full",
    "hungry", "sleepy", "curious", "honest", "lucky", "orange", "purple", "white", "black",
    "round", "narrow", "wide", "rusty", "shiny", "humble", "eager", "odd", "early",
];

#[rustfmt::skip]
const ADVERBS: &[&str] = &[
    "quickly", "slowly", "quietly", "loudly", "happily", "sadly", "gently", "carefully", "often",
    "rarely", "always", "never", "bravely", "softly", "eagerly", "calmly", "again", "together",
    "alone", "early",
];

#[rustfmt::skip]
const NAMES: &[&str] = &[
    "Alice", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Kara",
    "Leo", "Mira", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will",
    "Xena", "Yuri", "Zoe", "Ada", "Omar", "Lena", "Hugo", "Nina", "Otto", "Ivy", "Max", "Ruth",
    "Theo", "Maya", "Eli", "Anna", "Tom",
];

#[rustfmt::skip]
const PLACES: &[&str] = &[
    "Paris", "London", "Lisbon", "Cairo", "Tokyo", "Lima", "Oslo", "Rome", "Vienna", "Dublin",
    "Madrid", "Prague", "Berlin", "Athens", "Quito", "Nairobi", "Seoul", "Hanoi", "Delhi",
    "Sydney", "Boston", "Denver", "Austin", "Geneva", "Bergen", "Porto", "Krakow", "Tunis",
    "Accra", "Perth",
];

#[rustfmt::skip]
const PREPOSITIONS: &[&str] = &[
    "near", "behind", "under", "beside", "above", "inside", "around", "across", "along", "past",
    "below", "beyond",
];

#[rustfmt::skip]
const TIMES: &[&str] = &[
    "In the morning", "At night", "Later", "Yesterday", "After the rain", "Every day", "On Sunday",
    "In the spring", "That evening", "Soon",
];

/// The phrases after which only the hero's name may follow (the copy cue).
pub const COPY_CUES: &[&str] = &[
    "In the end, the gift was for ",
    "Everyone still talks about ",
    "That is the story of ",
    "The whole village thanked ",
];

const BRACKETS: [(char, char); 3] = [('(', ')'), ('[', ']'), ('{', '}')];

// ----------------------------------------------------------------------------------------
// The generator.

struct Gen {
    rng: Rng,
    text: String,
    labels: Vec<u8>,
    spans: Vec<Span>,
    hero: &'static str,
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

fn article(next_word: &str) -> &'static str {
    match next_word.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'u') => "an",
        _ => "a",
    }
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl Gen {
    fn new(rng: Rng) -> Self {
        Gen {
            rng,
            text: String::new(),
            labels: Vec::new(),
            spans: Vec::new(),
            hero: "",
        }
    }

    fn push(&mut self, s: &str, label: u8) {
        self.text.push_str(s);
        self.labels.extend(std::iter::repeat_n(label, s.len()));
    }

    fn finish(self) -> BuiltinDoc {
        BuiltinDoc {
            text: self.text,
            labels: self.labels,
            spans: self.spans,
        }
    }

    fn coin(&mut self, p: f64) -> bool {
        self.rng.uniform() < p
    }

    fn story(&mut self) {
        // The introduction: the hero's name is content here, and computed when copied later.
        self.hero = pick(&mut self.rng, NAMES);
        let adj = pick(&mut self.rng, ADJECTIVES);
        let noun = pick(&mut self.rng, NOUNS).0;
        self.push("There once was ", EASY);
        self.push(article(adj), EASY);
        self.push(" ", EASY);
        self.push(adj, CONTENT);
        self.push(" ", EASY);
        self.push(noun, CONTENT);
        self.push(" named ", EASY);
        let hero = self.hero;
        self.push(hero, CONTENT);
        self.push(".", EASY);
        let n = 6 + self.rng.below(10);
        for _ in 0..n {
            let sep = if self.coin(0.2) { "\n" } else { " " };
            self.push(sep, EASY);
            let r = self.rng.uniform();
            if r < 0.50 {
                self.grammar_sentence();
            } else if r < 0.64 {
                self.arithmetic_sentence();
            } else if r < 0.76 {
                self.bracket_sentence();
            } else if r < 0.88 {
                self.copy_sentence();
            } else {
                self.sort_sentence();
            }
        }
    }

    /// A noun phrase; returns whether it is plural. `start` capitalises the first word.
    fn noun_phrase(&mut self, start: bool) -> bool {
        if self.coin(0.25) {
            let name = pick(&mut self.rng, NAMES);
            self.push(name, CONTENT);
            return false;
        }
        let plural = self.coin(0.4);
        let adj = if self.coin(0.5) {
            Some(pick(&mut self.rng, ADJECTIVES))
        } else {
            None
        };
        let (sg, pl) = pick(&mut self.rng, NOUNS);
        let noun = if plural { pl } else { sg };
        let det: &str = if plural {
            pick(
                &mut self.rng,
                &["the", "some", "many", "these", "those", "two", "three"],
            )
        } else {
            match self.rng.below(4) {
                0 => article(adj.unwrap_or(noun)),
                1 => "this",
                2 => "every",
                _ => "the",
            }
        };
        let det = if start { cap(det) } else { det.to_string() };
        self.push(&det, EASY);
        self.push(" ", EASY);
        if let Some(a) = adj {
            self.push(a, CONTENT);
            self.push(" ", EASY);
        }
        self.push(noun, CONTENT);
        plural
    }

    fn grammar_sentence(&mut self) {
        match self.rng.below(4) {
            0 | 1 => {
                // [Time,] NP V [NP | Adv] [Prep NP].
                let time = self.coin(0.3);
                if time {
                    let t = pick(&mut self.rng, TIMES);
                    self.push(t, EASY);
                    self.push(", ", EASY);
                }
                let plural = self.noun_phrase(!time);
                let past = self.coin(0.5);
                let transitive = self.coin(0.6);
                let (base, sg, pa) = if transitive {
                    pick(&mut self.rng, VERBS_T)
                } else {
                    pick(&mut self.rng, VERBS_I)
                };
                let verb = if past {
                    pa
                } else if plural {
                    base
                } else {
                    sg
                };
                self.push(" ", EASY);
                self.push(verb, CONTENT);
                if transitive {
                    self.push(" ", EASY);
                    self.noun_phrase(false);
                } else if self.coin(0.5) {
                    let adv = pick(&mut self.rng, ADVERBS);
                    self.push(" ", EASY);
                    self.push(adv, CONTENT);
                }
                if self.coin(0.4) {
                    let p = pick(&mut self.rng, PREPOSITIONS);
                    self.push(" ", EASY);
                    self.push(p, EASY);
                    self.push(" ", EASY);
                    self.noun_phrase(false);
                }
                self.push(".", EASY);
            }
            2 => {
                // NP is/are Adj.
                let plural = self.noun_phrase(true);
                let past = self.coin(0.4);
                let cop = match (past, plural) {
                    (false, false) => " is ",
                    (false, true) => " are ",
                    (true, false) => " was ",
                    (true, true) => " were ",
                };
                self.push(cop, EASY);
                let adj = pick(&mut self.rng, ADJECTIVES);
                self.push(adj, CONTENT);
                if self.coin(0.3) {
                    self.push(" and ", EASY);
                    let adj = pick(&mut self.rng, ADJECTIVES);
                    self.push(adj, CONTENT);
                }
                self.push(".", EASY);
            }
            _ => {
                // Name went to Place [with Name].
                let a = pick(&mut self.rng, NAMES);
                self.push(a, CONTENT);
                self.push(" went to ", EASY);
                let place = pick(&mut self.rng, PLACES);
                self.push(place, CONTENT);
                if self.coin(0.5) {
                    self.push(" with ", EASY);
                    let b = pick(&mut self.rng, NAMES);
                    self.push(b, CONTENT);
                }
                self.push(".", EASY);
            }
        }
    }

    fn arithmetic_sentence(&mut self) {
        let name = pick(&mut self.rng, NAMES);
        self.push(name, CONTENT);
        self.push(" wrote ", EASY);
        let start = self.text.len();
        let (a, op, b, c) = arithmetic(&mut self.rng);
        self.push(&a.to_string(), CONTENT);
        self.push(&format!(" {op} "), EASY);
        self.push(&b.to_string(), CONTENT);
        self.push(" = ", EASY);
        self.push(&c.to_string(), COMPUTED);
        self.spans.push(Span {
            kind: SpanKind::Arithmetic,
            start,
            end: self.text.len(),
        });
        self.push(".", EASY);
    }

    fn bracket_sentence(&mut self) {
        let name = pick(&mut self.rng, NAMES);
        self.push(name, CONTENT);
        self.push(" drew ", EASY);
        let start = self.text.len();
        let pairs = 2 + self.rng.below(5);
        for (i, (c, closer)) in bracket_sequence(&mut self.rng, pairs)
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                self.push(" ", EASY);
            }
            self.push(&c.to_string(), if closer { COMPUTED } else { CONTENT });
        }
        self.spans.push(Span {
            kind: SpanKind::Brackets,
            start,
            end: self.text.len(),
        });
        self.push(" on the wall.", EASY);
    }

    fn copy_sentence(&mut self) {
        let cue = pick(&mut self.rng, COPY_CUES);
        self.push(cue, EASY);
        let start = self.text.len();
        let hero = self.hero;
        self.push(hero, COMPUTED);
        self.spans.push(Span {
            kind: SpanKind::Copy,
            start,
            end: self.text.len(),
        });
        self.push(".", EASY);
    }

    fn sort_sentence(&mut self) {
        let name = pick(&mut self.rng, NAMES);
        self.push(name, CONTENT);
        self.push(" sorted ", EASY);
        let start = self.text.len();
        let n = 3 + self.rng.below(3);
        let mut xs: Vec<u32> = (0..n).map(|_| self.rng.below(100) as u32).collect();
        for (i, x) in xs.iter().enumerate() {
            if i > 0 {
                self.push(" ", EASY);
            }
            self.push(&x.to_string(), CONTENT);
        }
        self.push(" into ", EASY);
        xs.sort_unstable();
        for (i, x) in xs.iter().enumerate() {
            if i > 0 {
                self.push(" ", EASY);
            }
            self.push(&x.to_string(), COMPUTED);
        }
        self.spans.push(Span {
            kind: SpanKind::Sort,
            start,
            end: self.text.len(),
        });
        self.push(".", EASY);
    }
}

/// A random `(a, op, b, a op b)` with a non-negative result.
fn arithmetic(rng: &mut Rng) -> (u32, char, u32, u32) {
    match rng.below(3) {
        0 => {
            let (a, b) = (rng.below(100) as u32, rng.below(100) as u32);
            (a, '+', b, a + b)
        }
        1 => {
            let (x, y) = (rng.below(100) as u32, rng.below(100) as u32);
            let (a, b) = (x.max(y), x.min(y));
            (a, '-', b, a - b)
        }
        _ => {
            let (a, b) = (rng.below(13) as u32, rng.below(13) as u32);
            (a, '*', b, a * b)
        }
    }
}

/// A random balanced sequence of `pairs` bracket pairs as (char, is_closer).
fn bracket_sequence(rng: &mut Rng, pairs: usize) -> Vec<(char, bool)> {
    let mut out = Vec::with_capacity(2 * pairs);
    let mut stack: Vec<char> = Vec::new();
    let mut opened = 0;
    while out.len() < 2 * pairs {
        let must_open = stack.is_empty();
        let can_open = opened < pairs && stack.len() < 4;
        if must_open || (can_open && rng.uniform() < 0.5) {
            let (o, c) = BRACKETS[rng.below(3)];
            stack.push(c);
            opened += 1;
            out.push((o, false));
        } else if let Some(c) = stack.pop() {
            out.push((c, true));
        }
    }
    out
}

// ----------------------------------------------------------------------------------------
// The built-in multiple-choice tasks.

/// Names of the built-in multiple-choice task sets, in the order [`builtin_mc_tasks`] returns
/// them.
pub const BUILTIN_TASKS: [&str; 5] = ["arithmetic", "brackets", "copy", "sorting", "agreement"];

/// A small multiple-choice suite from the built-in grammar, `n` items per task (see
/// [`BUILTIN_TASKS`]). Contexts end without a trailing space and each choice starts with one,
/// as in lm-eval. The gold choice sits at a random position.
///
/// - `arithmetic`: `Tom wrote 12 + 7 =` → ` 19` against three near misses;
/// - `brackets`: a bracket prefix → the matching closer against the two others;
/// - `copy`: a story introducing the hero, a few sentences, then a copy cue → the hero against
///   three other names;
/// - `sorting`: `Ben sorted 42 7 19 into` → the sorted list against three other orders;
/// - `agreement`: `The old foxes` → the verb form that agrees against the one that does not.
pub fn builtin_mc_tasks(seed: u64, n: usize) -> Vec<McTaskSet> {
    BUILTIN_TASKS
        .iter()
        .map(|&name| {
            let mut rng = Rng::derive(seed, &format!("builtin/mc/{name}"));
            let items = (0..n).map(|_| mc_item(name, &mut rng)).collect();
            McTaskSet {
                name: name.to_string(),
                items,
            }
        })
        .collect()
}

/// Puts `gold` among `wrong` at a random position.
fn shuffle_choices(rng: &mut Rng, context: String, gold: String, wrong: Vec<String>) -> McTask {
    let mut choices = wrong;
    let pos = rng.below(choices.len() + 1);
    choices.insert(pos, gold);
    McTask {
        context,
        choices,
        gold: pos,
    }
}

fn mc_item(task: &str, rng: &mut Rng) -> McTask {
    match task {
        "arithmetic" => {
            let name = pick(rng, NAMES);
            let (a, op, b, c) = arithmetic(rng);
            let mut wrong: Vec<u32> = Vec::new();
            for delta in [1i64, -1, 10, -10, 2, -2, 11] {
                let w = c as i64 + delta;
                if w >= 0 && wrong.len() < 3 {
                    wrong.push(w as u32);
                }
            }
            let wrong = wrong.iter().map(|w| format!(" {w}")).collect();
            shuffle_choices(
                rng,
                format!("{name} wrote {a} {op} {b} ="),
                format!(" {c}"),
                wrong,
            )
        }
        "brackets" => {
            let name = pick(rng, NAMES);
            let pairs = 2 + rng.below(5);
            let seq = bracket_sequence(rng, pairs);
            let closers: Vec<usize> = (0..seq.len()).filter(|&i| seq[i].1).collect();
            let cut = closers[rng.below(closers.len())];
            let prefix: Vec<String> = seq[..cut].iter().map(|(c, _)| c.to_string()).collect();
            let gold = seq[cut].0;
            let wrong = BRACKETS
                .iter()
                .map(|b| b.1)
                .filter(|&c| c != gold)
                .map(|c| format!(" {c}"))
                .collect();
            shuffle_choices(
                rng,
                format!("{name} drew {}", prefix.join(" ")),
                format!(" {gold}"),
                wrong,
            )
        }
        "copy" => {
            let mut g = Gen::new(Rng::new(rng.next_u64()));
            g.hero = pick(&mut g.rng, NAMES);
            let hero = g.hero;
            let noun = pick(&mut g.rng, NOUNS).0;
            g.push(
                &format!("There once was {} {noun} named {hero}.", article(noun)),
                EASY,
            );
            for _ in 0..2 + g.rng.below(3) {
                g.push(" ", EASY);
                g.grammar_sentence();
            }
            let cue = pick(rng, COPY_CUES);
            let mut wrong = Vec::new();
            while wrong.len() < 3 {
                let w = pick(rng, NAMES);
                if w != hero && !wrong.contains(&w) {
                    wrong.push(w);
                }
            }
            let context = format!("{} {}", g.text, cue.trim_end());
            shuffle_choices(
                rng,
                context,
                format!(" {hero}"),
                wrong.iter().map(|w| format!(" {w}")).collect(),
            )
        }
        "sorting" => {
            let name = pick(rng, NAMES);
            let n = 3 + rng.below(3);
            let mut xs: Vec<u32> = Vec::new();
            while xs.len() < n {
                let x = rng.below(100) as u32;
                if !xs.contains(&x) {
                    xs.push(x);
                }
            }
            let join = |v: &[u32]| {
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let context = format!("{name} sorted {} into", join(&xs));
            let mut sorted = xs.clone();
            sorted.sort_unstable();
            let mut wrong: Vec<String> = Vec::new();
            let mut rev = sorted.clone();
            rev.reverse();
            for cand in [rev, xs.clone()] {
                let s = format!(" {}", join(&cand));
                if cand != sorted && !wrong.contains(&s) {
                    wrong.push(s);
                }
            }
            while wrong.len() < 3 {
                let mut cand = sorted.clone();
                rng.shuffle(&mut cand);
                let s = format!(" {}", join(&cand));
                if cand != sorted && !wrong.contains(&s) {
                    wrong.push(s);
                }
            }
            shuffle_choices(rng, context, format!(" {}", join(&sorted)), wrong)
        }
        _ => {
            // Agreement: present tense, singular or plural subject.
            let plural = rng.uniform() < 0.5;
            let adj = pick(rng, ADJECTIVES);
            let (sg, pl) = pick(rng, NOUNS);
            let (base, third, _) = pick(rng, VERBS_I);
            let context = format!("The {adj} {}", if plural { pl } else { sg });
            let (gold, wrong) = if plural { (base, third) } else { (third, base) };
            shuffle_choices(rng, context, format!(" {gold}"), vec![format!(" {wrong}")])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_cover_every_byte() {
        for i in 0..20 {
            let d = builtin_doc(5, i);
            assert_eq!(d.text.len(), d.labels.len());
            assert!(d.text.is_ascii());
        }
    }

    #[test]
    fn bracket_sequences_balance() {
        let mut rng = Rng::new(1);
        for pairs in 1..8 {
            let seq = bracket_sequence(&mut rng, pairs);
            assert_eq!(seq.len(), 2 * pairs);
            let mut stack = Vec::new();
            for (c, closer) in seq {
                if closer {
                    let open = stack.pop().unwrap();
                    assert!(BRACKETS.contains(&(open, c)));
                } else {
                    stack.push(c);
                }
            }
            assert!(stack.is_empty());
        }
    }
}
