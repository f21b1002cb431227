//! `cargo xtask check-docs`: README_zh.md mirrors README.md, every relative
//! link of the documentation resolves, and the settings table matches the
//! services' command lines (see [`crate::settings`]).
//!
//! The Chinese README is a translation, so its prose cannot be compared with the
//! English one; its shape can. Outside code blocks both must have the same
//! headings: as many, of the same levels, in the same order (the text may be
//! translated). Both must have the same code blocks, byte for byte and in order:
//! they are the commands a reader copies. And every relative link (or image) of
//! README.md, README_zh.md and docs/*.md must name a file or directory of the
//! repository; a `#anchor` into an English markdown file must name one of its
//! headings, by GitHub's slugs. Anchors into a `*_zh.md` file are not checked:
//! GitHub's slugs of Chinese headings, with their full-width punctuation, are
//! not worth imitating here, and the English files are where anchors point.
//!
//! The markdown is read by pulldown-cmark, as GitHub reads it (CommonMark with
//! tables), so a `#` inside a fenced block is not a heading, ``` and ~~~ fences
//! and indented blocks are code, and reference-style links are links.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

/// The README and its translation; the translation must mirror the original.
const ORIGINAL: &str = "README.md";
const TRANSLATION: &str = "README_zh.md";
/// Besides the two READMEs, every markdown file in this folder has its links checked.
const DOCS_DIR: &str = "docs";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The repository to check (default: the workspace this xtask belongs to).
    #[arg(long)]
    root: Option<PathBuf>,
}

/// Checks the repository, prints every problem (or the one-line summary), and
/// says whether it passed.
pub fn run(args: Args) -> anyhow::Result<bool> {
    let root = args.root.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let mut report = check(&root)?;
    let table = root.join(crate::settings::FILE);
    let table =
        std::fs::read_to_string(&table).with_context(|| format!("reading {}", table.display()))?;
    let services = crate::settings::services();
    report.problems.extend(crate::settings::check(&table, &services));
    let settings: usize = services.iter().map(|(_, settings)| settings.len()).sum();
    for problem in &report.problems {
        println!("{problem}");
    }
    if report.problems.is_empty() {
        println!(
            "check-docs: {ORIGINAL} and {TRANSLATION} agree ({} headings, {} code blocks), {} links resolve, \
             {settings} settings of the services match {}",
            report.headings,
            report.code_blocks,
            report.links,
            crate::settings::FILE
        );
        Ok(true)
    } else {
        println!("check-docs: FAILED ({} problems)", report.problems.len());
        Ok(false)
    }
}

/// What [`check`] found.
#[derive(Debug)]
pub struct Report {
    /// Headings of README.md (README_zh.md must have as many).
    pub headings: usize,
    /// Code blocks of README.md.
    pub code_blocks: usize,
    /// Relative links checked in every file.
    pub links: usize,
    pub problems: Vec<Problem>,
}

/// One thing wrong, at a line of a file (the path relative to the repository).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.what)
    }
}

/// Checks README_zh.md against README.md, and the links of both and of docs/*.md.
pub fn check(root: &Path) -> anyhow::Result<Report> {
    let mut files = vec![ORIGINAL.to_owned(), TRANSLATION.to_owned()];
    let docs = root.join(DOCS_DIR);
    let mut in_docs = Vec::new();
    for entry in std::fs::read_dir(&docs).with_context(|| format!("reading {}", docs.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".md") {
            in_docs.push(format!("{DOCS_DIR}/{name}"));
        }
    }
    in_docs.sort();
    files.extend(in_docs);

    let mut parsed = BTreeMap::new();
    for file in &files {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        parsed.insert(file.clone(), parse(&text));
    }

    let original = &parsed[ORIGINAL];
    let mut problems = compare(ORIGINAL, original, TRANSLATION, &parsed[TRANSLATION]);
    let mut links = 0;
    let mut targets = Targets { root, parsed: HashMap::new() };
    for file in &files {
        let doc = &parsed[file];
        links += doc.links.len();
        problems.extend(check_links(file, doc, &mut targets));
    }
    Ok(Report {
        headings: original.headings.len(),
        code_blocks: original.code_blocks.len(),
        links,
        problems,
    })
}

/// The parts of a markdown file that are checked.
#[derive(Debug, Default)]
pub struct Doc {
    pub headings: Vec<Heading>,
    pub code_blocks: Vec<CodeBlock>,
    /// Relative links and images only: web addresses are not checked.
    pub links: Vec<Link>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heading {
    pub line: usize,
    /// 1 for `#`, 2 for `##`, ...
    pub level: usize,
    /// The text as GitHub makes its anchor from it (inline code included).
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeBlock {
    pub line: usize,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub line: usize,
    pub dest: String,
}

/// Reads the headings, code blocks and relative links of a markdown text.
pub fn parse(text: &str) -> Doc {
    let line_starts: Vec<usize> =
        std::iter::once(0).chain(text.match_indices('\n').map(|(at, _)| at + 1)).collect();
    let line_of = |offset: usize| line_starts.partition_point(|&start| start <= offset);

    let mut doc = Doc::default();
    let mut heading: Option<Heading> = None;
    let mut code: Option<CodeBlock> = None;
    let options =
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    for (event, range) in Parser::new_ext(text, options).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                heading = Some(Heading {
                    line: line_of(range.start),
                    level: level as usize,
                    text: String::new(),
                });
            }
            Event::End(TagEnd::Heading(_)) => doc.headings.extend(heading.take()),
            Event::Start(Tag::CodeBlock(_)) => {
                // A fenced block's text starts on the line after its fence; the
                // fence's line is the one to point at.
                code = Some(CodeBlock { line: line_of(range.start), text: String::new() });
            }
            Event::End(TagEnd::CodeBlock) => doc.code_blocks.extend(code.take()),
            Event::Text(content) | Event::Code(content) => {
                if let Some(code) = &mut code {
                    code.text.push_str(&content);
                } else if let Some(heading) = &mut heading {
                    heading.text.push_str(&content);
                }
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. })
                if !is_web_address(&dest_url) =>
            {
                doc.links.push(Link { line: line_of(range.start), dest: dest_url.into_string() });
            }
            _ => {}
        }
    }
    doc
}

/// `https://...`, `mailto:...`: anything with a scheme, which is not a file here.
fn is_web_address(dest: &str) -> bool {
    let Some((scheme, _)) = dest.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The problems that keep `translation` from mirroring `original`. After the
/// first heading (or code block) that differs, the later ones of that kind are
/// not compared: one missing heading would otherwise fail every one after it.
pub fn compare(
    original_name: &str,
    original: &Doc,
    translation_name: &str,
    translation: &Doc,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let at = |file: &str, line, what: String| Problem { file: file.to_owned(), line, what };

    let pairs = original.headings.iter().zip(&translation.headings).enumerate();
    if let Some((i, (ours, theirs))) =
        pairs.clone().find(|(_, (ours, theirs))| ours.level != theirs.level)
    {
        problems.push(at(
            translation_name,
            theirs.line,
            format!(
                "heading {} is level {} ({:?}) but {original_name}:{} has level {} ({:?}); later headings not compared",
                i + 1,
                theirs.level,
                theirs.text,
                ours.line,
                ours.level,
                ours.text
            ),
        ));
    }
    let (ours, theirs) = (original.headings.len(), translation.headings.len());
    if ours != theirs {
        let (file, extra, other) = if ours > theirs {
            (original_name, &original.headings[theirs], translation_name)
        } else {
            (translation_name, &translation.headings[ours], original_name)
        };
        problems.push(at(
            file,
            extra.line,
            format!(
                "heading {} ({:?}) has no counterpart in {other} ({original_name} has {ours} headings, \
                 {translation_name} {theirs})",
                ours.min(theirs) + 1,
                extra.text
            ),
        ));
    }

    let pairs = original.code_blocks.iter().zip(&translation.code_blocks).enumerate();
    if let Some((i, (ours, theirs))) =
        pairs.clone().find(|(_, (ours, theirs))| ours.text != theirs.text)
    {
        let (line, mine, yours) = ours
            .text
            .lines()
            .zip(theirs.text.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(n, (a, b))| (n + 1, a, b))
            .unwrap_or((ours.text.lines().count().min(theirs.text.lines().count()) + 1, "", ""));
        problems.push(at(
            translation_name,
            theirs.line,
            format!(
                "code block {} differs from {original_name}:{}'s, first at its line {line}: {yours:?} where the \
                 original has {mine:?}; later code blocks not compared",
                i + 1,
                ours.line
            ),
        ));
    }
    let (ours, theirs) = (original.code_blocks.len(), translation.code_blocks.len());
    if ours != theirs {
        let (file, extra, other) = if ours > theirs {
            (original_name, &original.code_blocks[theirs], translation_name)
        } else {
            (translation_name, &translation.code_blocks[ours], original_name)
        };
        problems.push(at(
            file,
            extra.line,
            format!(
                "code block {} has no counterpart in {other} ({original_name} has {ours} code blocks, \
                 {translation_name} {theirs})",
                ours.min(theirs) + 1
            ),
        ));
    }
    problems
}

/// Markdown files that links point into, read once each, for their anchors.
struct Targets<'a> {
    root: &'a Path,
    /// By path relative to the root; `None` when it could not be read.
    parsed: HashMap<PathBuf, Option<HashSet<String>>>,
}

impl Targets<'_> {
    fn anchors(&mut self, file: &Path) -> Option<&HashSet<String>> {
        let root = self.root;
        self.parsed
            .entry(file.to_owned())
            .or_insert_with(|| {
                let text = std::fs::read_to_string(root.join(file)).ok()?;
                Some(anchors(&parse(&text)))
            })
            .as_ref()
    }
}

/// The problems with the relative links of `file` (relative to the root).
fn check_links(file: &str, doc: &Doc, targets: &mut Targets<'_>) -> Vec<Problem> {
    let here = Path::new(file);
    let dir = here.parent().unwrap_or(Path::new(""));
    let mut problems = Vec::new();
    let mut fail =
        |line, what: String| problems.push(Problem { file: file.to_owned(), line, what });
    for link in &doc.links {
        let (path, anchor) = match link.dest.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (link.dest.as_str(), None),
        };
        let path = path.split_once('?').map_or(path, |(path, _query)| path);
        let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        let target = if path.is_empty() {
            here.to_owned()
        } else {
            let Some(target) = resolve(dir, &path) else {
                fail(link.line, format!("link {:?} leads out of the repository", link.dest));
                continue;
            };
            if !targets.root.join(&target).exists() {
                fail(
                    link.line,
                    format!("link {:?}: no such file ({})", link.dest, target.display()),
                );
                continue;
            }
            target
        };
        let Some(anchor) = anchor.filter(|anchor| !anchor.is_empty()) else { continue };
        let name = target.to_string_lossy();
        if !name.ends_with(".md") || name.ends_with("_zh.md") {
            continue;
        }
        let anchor = percent_encoding::percent_decode_str(anchor).decode_utf8_lossy();
        match targets.anchors(&target) {
            Some(anchors) if anchors.contains(anchor.as_ref()) => {}
            Some(_) => fail(
                link.line,
                format!(
                    "link {:?}: {} has no heading whose anchor is #{anchor}",
                    link.dest,
                    target.display()
                ),
            ),
            None => fail(
                link.line,
                format!("link {:?}: {} cannot be read", link.dest, target.display()),
            ),
        }
    }
    problems
}

/// `rel` from the folder `dir`, both relative to the root, with `.` and `..`
/// taken out; `None` if it climbs above the root. A leading `/` is the root,
/// as on GitHub.
fn resolve(dir: &Path, rel: &str) -> Option<PathBuf> {
    let (base, rel) = match rel.strip_prefix('/') {
        Some(rel) => (Path::new(""), rel),
        None => (dir, rel),
    };
    let mut out = PathBuf::new();
    for component in base.join(rel).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The anchors GitHub gives a file's headings.
pub fn anchors(doc: &Doc) -> HashSet<String> {
    let mut seen = HashSet::new();
    for heading in &doc.headings {
        let base = slug(&heading.text);
        let mut anchor = base.clone();
        let mut n = 0;
        while !seen.insert(anchor.clone()) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
    }
    seen
}

/// GitHub's anchor for a heading's text: lower case, spaces become hyphens,
/// punctuation other than `-` and `_` is dropped.
pub fn slug(text: &str) -> String {
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(doc: &Doc) -> Vec<usize> {
        doc.headings.iter().map(|h| h.level).collect()
    }

    #[test]
    fn headings_inside_fences_are_not_headings() {
        let doc = parse(
            "# Title\n\ntext\n\n```sh\n# a comment\n## not a heading\n```\n\n~~~\n# nor this\n~~~\n\n\
             ## Section `code`\n\n    # indented code\n\nSetext\n------\n",
        );
        assert_eq!(levels(&doc), [1, 2, 2]);
        assert_eq!(doc.headings[0].line, 1);
        assert_eq!(doc.headings[1].text, "Section code");
        assert_eq!(doc.headings[1].line, 14);
        assert_eq!(doc.headings[2].text, "Setext");
    }

    #[test]
    fn fences_of_backticks_tildes_and_indented_blocks_are_code() {
        let doc = parse(
            "intro\n\n```sh\necho one\n# two\n```\n\n~~~\ntildes ``` inside\n~~~\n\n````md\n```\nnested\n```\n````\n\n\
             para\n\n    indented\n",
        );
        let texts: Vec<&str> = doc.code_blocks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            ["echo one\n# two\n", "tildes ``` inside\n", "```\nnested\n```\n", "indented\n"]
        );
        let lines: Vec<usize> = doc.code_blocks.iter().map(|c| c.line).collect();
        assert_eq!(lines, [3, 8, 12, 20]);
    }

    #[test]
    fn relative_links_and_images_are_read_web_addresses_are_not() {
        let doc = parse(
            "See [the ops](docs/operations.md#metrics), [a section](#quick-start) and\n\
             ![chart](docs/soak.svg).\n\n| a | [b](crates/outbox/README.md) |\n|---|---|\n\n\
             [web](https://example.com) [mail](mailto:a@b.c) <http://x.y> [ref][r]\n\n\
             `[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n\n[r]: deploy/standins/README.md\n",
        );
        let dests: Vec<(&str, usize)> =
            doc.links.iter().map(|l| (l.dest.as_str(), l.line)).collect();
        assert_eq!(
            dests,
            [
                ("docs/operations.md#metrics", 1),
                ("#quick-start", 1),
                ("docs/soak.svg", 2),
                ("crates/outbox/README.md", 4),
                ("deploy/standins/README.md", 7),
            ]
        );
    }

    #[test]
    fn slugs_are_githubs() {
        assert_eq!(slug("Writing orders (group commit)"), "writing-orders-group-commit");
        assert_eq!(
            slug("Proving nothing was lost: order-service reconcile"),
            "proving-nothing-was-lost-order-service-reconcile"
        );
        assert_eq!(slug("The outbox library, and Kafka"), "the-outbox-library-and-kafka");
        assert_eq!(slug("Step 1. snake_case"), "step-1-snake_case");
        let doc = parse("# A\n## Usage\n## Usage\n### Usage\n");
        let anchors = anchors(&doc);
        assert!(
            ["a", "usage", "usage-1", "usage-2"].iter().all(|a| anchors.contains(*a)),
            "{anchors:?}"
        );
    }

    const ORIGINAL_TEXT: &str = "# outbox\n\n## Run it\n\n```sh\ndocker compose up\n```\n\n## Test it\n\n\
                                 ```sh\nscripts/test.sh\n```\n";

    #[test]
    fn a_faithful_translation_agrees() {
        let zh = "# outbox\n\n## 运行\n\n```sh\ndocker compose up\n```\n\n## 测试\n\n```sh\nscripts/test.sh\n```\n";
        assert_eq!(compare("README.md", &parse(ORIGINAL_TEXT), "README_zh.md", &parse(zh)), []);
    }

    #[test]
    fn a_heading_of_another_level_is_found() {
        let zh = "# outbox\n\n## 运行\n\n```sh\ndocker compose up\n```\n\n### 测试\n\n```sh\nscripts/test.sh\n```\n";
        let problems = compare("README.md", &parse(ORIGINAL_TEXT), "README_zh.md", &parse(zh));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!((problems[0].file.as_str(), problems[0].line), ("README_zh.md", 9));
        assert!(problems[0].what.starts_with("heading 3 is level 3"), "{}", problems[0]);
    }

    #[test]
    fn a_missing_heading_and_a_changed_command_are_found() {
        let zh = "# outbox\n\n## 运行\n\n```sh\ndocker compose up -d\n```\n\n```sh\nscripts/test.sh\n```\n";
        let problems = compare("README.md", &parse(ORIGINAL_TEXT), "README_zh.md", &parse(zh));
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with("README.md:9: heading 3 (\"Test it\") has no counterpart"),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].starts_with(
                "README_zh.md:5: code block 1 differs from README.md:5's, first at its line 1: \
                                  \"docker compose up -d\""
            ),
            "{}",
            shown[1]
        );
    }

    #[test]
    fn an_extra_code_block_is_found() {
        let zh = format!("{ORIGINAL_TEXT}\n```\nmore\n```\n");
        let problems = compare("README.md", &parse(ORIGINAL_TEXT), "README_zh.md", &parse(&zh));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].line, 15);
        assert!(
            problems[0].what.contains("code block 3 has no counterpart in README.md"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn paths_resolve_against_the_file_s_folder() {
        let docs = Path::new("docs");
        assert_eq!(
            resolve(docs, "../deploy/standins/README.md"),
            Some("deploy/standins/README.md".into())
        );
        assert_eq!(resolve(docs, "./soak.svg"), Some("docs/soak.svg".into()));
        assert_eq!(resolve(docs, "/crates/xtask"), Some("crates/xtask".into()));
        assert_eq!(resolve(Path::new(""), "../elsewhere.md"), None);
    }

    /// A repository in a temporary folder, removed when dropped.
    struct Repo(PathBuf);

    impl Repo {
        fn new(name: &str, files: &[(&str, &str)]) -> Repo {
            let root =
                std::env::temp_dir().join(format!("check-docs-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for (path, text) in files {
                let path = root.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
            Repo(root)
        }
    }

    impl Drop for Repo {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn links_that_resolve_pass_and_broken_ones_are_each_reported() {
        let readme = "# outbox\n\n## Docs\n\n[ops](docs/operations.md#metrics) [zh](README_zh.md#任何) \
                      [up](#docs) [web](https://example.com)\n";
        let zh = "# outbox\n\n## 文档\n\n[运维](docs/operations.md#metrics) [自己](#文档)\n";
        let operations = "# Operations\n\n## Metrics\n\n[back](../README.md#docs) [code](../crates/x/src/lib.rs)\n\
                          [gone](../deploy/nothing.md) [stale](../README.md#quick-start) [up](../../outside.md)\n";
        let repo = Repo::new(
            "links",
            &[
                ("README.md", readme),
                ("README_zh.md", zh),
                ("docs/operations.md", operations),
                ("crates/x/src/lib.rs", ""),
            ],
        );
        let report = check(&repo.0).unwrap();
        let shown: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "docs/operations.md:6: link \"../deploy/nothing.md\": no such file (deploy/nothing.md)",
                "docs/operations.md:6: link \"../README.md#quick-start\": README.md has no heading whose anchor \
                 is #quick-start",
                "docs/operations.md:6: link \"../../outside.md\" leads out of the repository",
            ]
        );
        assert_eq!((report.headings, report.code_blocks, report.links), (2, 0, 10));
    }
}
