//! YAML syntax errors, found before any field is read and said in YAML terms. serde_norway
//! hands a struct the events parsed before a syntax error and reports the error only when
//! those run out, so without this pass an unclosed `{` shows up as a type error in
//! whatever the `{` swallowed, and a tab as a problem of the field it indents.

use serde::Deserialize;

/// What is wrong with the YAML, and the line to look at.
pub(super) struct SyntaxError {
    pub line: Option<usize>,
    pub message: String,
}

/// The text is one well-formed YAML document (its fields are not looked at).
pub(super) fn check(text: &str) -> Result<(), SyntaxError> {
    let de = serde_norway::Deserializer::from_str(text);
    let Err(e) = serde::de::IgnoredAny::deserialize(de) else {
        return Ok(());
    };
    let location = e.location().map(|l| (l.line(), l.column()));
    let full = e.to_string();
    let said = Said::split(&full);
    if let Some(line) = location.and_then(|(line, _)| tab_indented(text, line)) {
        return Err(SyntaxError {
            line: Some(line),
            message: "tab character used for indentation; YAML indents with spaces".into(),
        });
    }
    Err(explain(text, &said, location))
}

/// `line` (1-based) indents with a tab: libyaml stops there, saying only that a tab
/// "violates indentation" or "cannot start any token".
fn tab_indented(text: &str, line: usize) -> Option<usize> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let indent = &l[..l.len() - l.trim_start_matches([' ', '\t']).len()];
    indent.contains('\t').then_some(line)
}

/// libyaml's message in its parts: `PROBLEM at line L column C, CONTEXT at line L2 ...`.
struct Said<'a> {
    problem: &'a str,
    context: Option<&'a str>,
    context_line: Option<usize>,
}

impl<'a> Said<'a> {
    fn split(full: &'a str) -> Self {
        let (problem, rest) = split_at_mark(full);
        let context = rest.and_then(|r| r.split_once(", ")).map(|(_, c)| c);
        let (context, context_line) = match context.map(split_at_mark) {
            Some((c, mark)) => (Some(c), mark.and_then(line_number)),
            None => (None, None),
        };
        Said {
            problem,
            context,
            context_line,
        }
    }
}

/// `text at line 3 column 5...` -> (`text`, `3 column 5...`).
fn split_at_mark(s: &str) -> (&str, Option<&str>) {
    match s.find(" at line ") {
        Some(i) => (&s[..i], Some(&s[i + " at line ".len()..])),
        None => (s, None),
    }
}

fn line_number(s: &str) -> Option<usize> {
    s.split(' ').next()?.parse().ok()
}

/// The message. A flow collection or quoted string still open where libyaml gave up is
/// reported where it opens: libyaml notices only where it gives up, often lines later.
fn explain(text: &str, said: &Said, location: Option<(usize, usize)>) -> SyntaxError {
    let at = location.map_or(String::new(), |(l, c)| format!("at line {l} column {c}"));
    let problem = said.problem;
    let still_open = |line, what: &str, missing: &str| SyntaxError {
        line: Some(line),
        message: format!(
            "YAML syntax: the {what} opened on this line is still open {at} ({problem} \
             there); is {missing} missing?"
        ),
    };
    if let Some(((open, close), line)) = open_flow(text, said, location) {
        return still_open(line, &format!("`{open}`"), &format!("a `{close}`"));
    }
    if let (Some("while scanning a quoted scalar"), Some(line)) = (said.context, said.context_line)
    {
        return still_open(line, "quoted string", "a closing quote");
    }
    SyntaxError {
        line: location.map(|(l, _)| l),
        message: match said.context {
            Some(c) => format!("YAML syntax: {problem} ({c})"),
            None => format!("YAML syntax: {problem}"),
        },
    }
}

/// The flow collection libyaml was in when it gave up: its brackets and opening line.
fn open_flow(
    text: &str,
    said: &Said,
    location: Option<(usize, usize)>,
) -> Option<((char, char), usize)> {
    match (bracket(said.context), said.context_line) {
        (Some(b), Some(line)) => Some((b, line)),
        // `while parsing a flow node` marks the node, not the collection it is in.
        _ if said.context == Some("while parsing a flow node") => {
            let (line, column) = location?;
            enclosing_flow(text, line, column)
        }
        _ => None,
    }
}

/// The brackets of the flow collection libyaml names as the context of an error.
fn bracket(context: Option<&str>) -> Option<(char, char)> {
    match context? {
        "while parsing a flow mapping" => Some(('{', '}')),
        "while parsing a flow sequence" => Some(('[', ']')),
        _ => None,
    }
}

/// The flow collection open at `line`:`column` (1-based), where a node was expected: the
/// text cut there, with a null node (`~`) in place of what was wrong, ends inside the
/// collection, and libyaml names it, with the line of its bracket, as the error's context.
fn enclosing_flow(text: &str, line: usize, column: usize) -> Option<((char, char), usize)> {
    let line_start: usize = text
        .split_inclusive('\n')
        .take(line.checked_sub(1)?)
        .map(str::len)
        .sum();
    let cut = text[line_start..]
        .char_indices()
        .nth(column.checked_sub(1)?)
        .map_or(text.len(), |(i, _)| line_start + i);
    let cut = format!("{}~", &text[..cut]);
    let de = serde_norway::Deserializer::from_str(&cut);
    let full = serde::de::IgnoredAny::deserialize(de).err()?.to_string();
    let said = Said::split(&full);
    bracket(said.context).zip(said.context_line)
}
