//! Class hierarchies and the unit-sphere class embeddings computed from them (reference-spec
//! section 5): S_ij = 1 - h(LCS(i, j)) / H over the leaves sorted by integer id, and the embedding
//! is the lower Cholesky factor of S, so that <e_i, e_j> = S_ij and every row has unit length.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, bail};

/// A tree of integer node ids.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    parent: HashMap<i64, i64>,
    children: BTreeMap<i64, Vec<i64>>,
    root: i64,
}

impl Hierarchy {
    /// Parses `parent child` lines (`child parent` with `is_a`) and checks that they form a tree:
    /// integer ids, no node with two parents, exactly one root, no cycle.
    pub fn parse(text: &str, is_a: bool, name: &str) -> anyhow::Result<Self> {
        let mut parent = HashMap::new();
        let mut children: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        let mut nodes = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!("{name}:{}: expected two ids, got {line:?}", i + 1);
            };
            let id = |s: &str| {
                s.parse::<i64>()
                    .with_context(|| format!("{name}:{}: node id {s:?} is not an integer", i + 1))
            };
            let (a, b) = (id(a)?, id(b)?);
            let (p, c) = if is_a { (b, a) } else { (a, b) };
            if p == c {
                bail!("{name}:{}: node {c} is its own parent (a cycle)", i + 1);
            }
            if let Some(&old) = parent.get(&c)
                && old != p
            {
                bail!(
                    "{name}:{}: node {c} has two parents, {old} and {p} (not a tree)",
                    i + 1
                );
            }
            if parent.insert(c, p).is_none() {
                children.entry(p).or_default().push(c);
            }
            nodes.insert(p);
            nodes.insert(c);
        }
        let roots: Vec<i64> = nodes
            .iter()
            .copied()
            .filter(|n| !parent.contains_key(n))
            .collect();
        match roots.len() {
            0 if nodes.is_empty() => bail!("{name}: no edges"),
            0 => bail!("{name}: every node has a parent, so the edges contain a cycle"),
            1 => {}
            _ => bail!(
                "{name}: {} roots ({:?}...); a tree has one",
                roots.len(),
                &roots[..roots.len().min(5)]
            ),
        }
        let h = Hierarchy {
            parent,
            children,
            root: roots[0],
        };
        // Every node must be reached from the root; one on a cycle never is. Linear, so that a
        // long chain is not quadratic.
        let reached = h.top_down().len();
        if reached != nodes.len() {
            let on_cycle = nodes
                .iter()
                .find(|n| !h.reaches_root_within(**n, nodes.len()))
                .copied()
                .unwrap_or(h.root);
            bail!(
                "{name}: node {on_cycle} lies on a cycle (it never reaches the root {})",
                h.root
            );
        }
        Ok(h)
    }

    /// Whether following parents from `n` gets to the root in at most `steps` steps.
    fn reaches_root_within(&self, n: i64, steps: usize) -> bool {
        let mut cur = n;
        for _ in 0..=steps {
            if cur == self.root {
                return true;
            }
            match self.parent.get(&cur) {
                Some(&p) => cur = p,
                None => return false,
            }
        }
        false
    }

    /// The nodes reachable from the root, every parent before its children.
    fn top_down(&self) -> Vec<i64> {
        let mut order = vec![self.root];
        let mut next = 0;
        while next < order.len() {
            if let Some(cs) = self.children.get(&order[next]) {
                order.extend(cs.iter().copied());
            }
            next += 1;
        }
        order
    }

    pub fn from_file(path: &Path, is_a: bool) -> anyhow::Result<Self> {
        let text = datasets_prep::bounded::read_text_limited(path, FILE_LIMIT)
            .context("cannot read the hierarchy")?;
        Self::parse(&text, is_a, &path.display().to_string())
    }

    /// Leaves (nodes without children), ascending.
    pub fn leaves(&self) -> Vec<i64> {
        let mut leaves: Vec<i64> = self
            .parent
            .keys()
            .copied()
            .filter(|n| !self.children.contains_key(n))
            .collect();
        leaves.sort_unstable();
        leaves
    }

    /// Height of every node: 0 for leaves, else 1 + the highest child. Bottom-up without
    /// recursion (a chain 100,000 deep must not overflow the stack).
    pub fn heights(&self) -> HashMap<i64, usize> {
        let mut out: HashMap<i64, usize> = HashMap::new();
        for n in self.top_down().into_iter().rev() {
            let height = self
                .children
                .get(&n)
                .map_or(0, |cs| cs.iter().map(|c| out[c] + 1).max().unwrap_or(0));
            out.insert(n, height);
        }
        out
    }

    /// The path from `n` up to the root, `n` first.
    fn ancestors(&self, n: i64) -> Vec<i64> {
        let mut path = vec![n];
        while let Some(&p) = self.parent.get(path.last().expect("non-empty")) {
            path.push(p);
        }
        path
    }

    /// S_ij = 1 - h(LCS(i, j)) / H for the given classes (row-major, n x n).
    pub fn similarity(&self, classes: &[i64]) -> Vec<f64> {
        let heights = self.heights();
        let max_height = heights[&self.root].max(1) as f64;
        let paths: Vec<Vec<i64>> = classes.iter().map(|&c| self.ancestors(c)).collect();
        let n = classes.len();
        let mut s = vec![0.0; n * n];
        for i in 0..n {
            let up: HashMap<i64, usize> =
                paths[i].iter().enumerate().map(|(k, &a)| (a, k)).collect();
            for j in 0..=i {
                // In a tree the deepest common ancestor is the first of j's ancestors on i's path.
                let lcs = paths[j]
                    .iter()
                    .find(|a| up.contains_key(a))
                    .copied()
                    .unwrap_or(self.root);
                let v = 1.0 - heights[&lcs] as f64 / max_height;
                s[i * n + j] = v;
                s[j * n + i] = v;
            }
        }
        s
    }
}

/// Lower Cholesky factor of a symmetric positive-definite n x n matrix (row-major).
pub fn cholesky(s: &[f64], n: usize) -> anyhow::Result<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let d = s[i * n + i] - dot;
                if d <= 0.0 {
                    bail!("the similarity matrix is not positive definite (pivot {i} is {d})");
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (s[i * n + j] - dot) / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// The largest hierarchy file read.
const FILE_LIMIT: u64 = 256 << 20;

/// The most classes an embedding or similarity matrix is computed for: n x n doubles, twice
/// (10,000 classes take 1.6 GB).
pub const MAX_CLASSES: usize = 10_000;

/// Refuses more than [`MAX_CLASSES`] classes, before an n x n allocation.
pub fn check_class_count(n: usize, what: &str) -> anyhow::Result<()> {
    if n > MAX_CLASSES {
        bail!(
            "{what}: {n} classes; class similarities are computed for at most {MAX_CLASSES} \
             (an n x n matrix)"
        );
    }
    Ok(())
}

/// The unit-sphere embedding of a hierarchy's leaves: (class ids, n x n row-major matrix).
pub fn unitsphere_embedding(h: &Hierarchy) -> anyhow::Result<(Vec<i64>, Vec<f64>)> {
    let leaves = h.leaves();
    check_class_count(leaves.len(), "the hierarchy's leaves")?;
    let s = h.similarity(&leaves);
    Ok((leaves.clone(), cholesky(&s, leaves.len())?))
}

#[cfg(test)]
mod limits {
    use super::*;

    #[test]
    fn a_chain_100000_deep_parses_in_linear_time_without_overflowing() {
        let text: String = (0..100_000).map(|i| format!("{i} {}\n", i + 1)).collect();
        let start = std::time::Instant::now();
        let h = Hierarchy::parse(&text, false, "chain").unwrap();
        assert_eq!(h.heights()[&0], 100_000);
        assert_eq!(h.leaves(), vec![100_000]);
        // Not a benchmark: quadratic parsing took 32 s for 45,000 nodes (minutes for these),
        // linear takes milliseconds; the bound only catches a return to quadratic.
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        let cycle = "0 1\n2 3\n3 2\n";
        let err = Hierarchy::parse(cycle, false, "c").unwrap_err().to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn too_many_leaves_are_refused_before_the_matrix() {
        let text: String = (1..=MAX_CLASSES + 1).map(|i| format!("0 {i}\n")).collect();
        let h = Hierarchy::parse(&text, false, "wide").unwrap();
        let err = unitsphere_embedding(&h).unwrap_err().to_string();
        assert!(err.contains("at most 10000"), "{err}");
    }
}

#[cfg(test)]
mod parser_properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Hierarchy files are user input: any text parses or is refused, never panics, and
        /// whatever parses gets an embedding or a clear error.
        #[test]
        fn hierarchy_parser_never_panics(text in "[0-9 \\n\\t-]{0,120}", is_a in any::<bool>()) {
            if let Ok(h) = Hierarchy::parse(&text, is_a, "fuzz") {
                let _ = unitsphere_embedding(&h);
            }
        }

        #[test]
        fn mutated_trees_never_panic(edits in proptest::collection::vec((0usize..40, 0u8..12), 0..5)) {
            let mut bytes = b"1 2\n1 3\n2 4\n2 5\n3 6\n3 7\n".to_vec();
            for (i, b) in edits {
                let i = i % bytes.len();
                bytes[i] = b"0123456789 \n"[b as usize];
            }
            let text = String::from_utf8(bytes).unwrap();
            if let Ok(h) = Hierarchy::parse(&text, false, "fuzz") {
                let _ = unitsphere_embedding(&h);
            }
        }
    }
}
