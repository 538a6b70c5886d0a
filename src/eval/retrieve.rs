//! Retrieved few-shot examples: for each query, the training examples whose
//! user turns are most similar to it by BM25 (the `bm25` crate's in-memory
//! search engine, English stemming and stop words).

use super::HeldOut;
use bm25::{Document, Language, SearchEngine, SearchEngineBuilder};

/// A pool of training examples with their questions indexed for BM25
/// search. One index serves every use of the pool in a comparison
/// (retrieved few-shot and the near-duplicate check).
pub struct Retriever<'a> {
    pool: &'a [HeldOut],
    engine: SearchEngine<usize>,
}

impl<'a> Retriever<'a> {
    /// Indexes the questions (the last user turns) of `pool`.
    pub fn new(pool: &'a [HeldOut]) -> Self {
        let documents: Vec<Document<usize>> = pool
            .iter()
            .enumerate()
            .map(|(i, t)| Document::new(i, t.question()))
            .collect();
        Self {
            pool,
            engine: SearchEngineBuilder::with_documents(Language::English, documents).build(),
        }
    }

    /// The examples indexed; [`Self::nearest`] returns indices into it.
    pub fn pool(&self) -> &'a [HeldOut] {
        self.pool
    }

    /// The indices of the `k` training examples most similar to `query`, most
    /// similar first (ties by index). When fewer than `k` share a word with
    /// the query, the rest are the first others in training order.
    pub fn nearest(&self, query: &str, k: usize) -> Vec<usize> {
        let mut hits: Vec<(f32, usize)> = self
            .engine
            .search(query, None)
            .into_iter()
            .map(|r| (r.score, r.document.id))
            .collect();
        hits.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<usize> = hits.into_iter().map(|(_, i)| i).take(k).collect();
        for i in 0..self.pool.len() {
            if out.len() >= k {
                break;
            }
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Record;

    fn held(question: &str) -> HeldOut {
        HeldOut::from_record(&Record::Completion {
            prompt: question.into(),
            completion: "x".into(),
        })
        .unwrap()
    }

    #[test]
    fn the_most_similar_questions_come_first() {
        let train: Vec<HeldOut> = [
            "My invoice shows a double charge",
            "The app crashes when I upload a photo",
            "I was charged twice on my credit card invoice",
            "How do I reset my password?",
        ]
        .into_iter()
        .map(held)
        .collect();
        let r = Retriever::new(&train);
        let near = r.nearest("Why was my card charged twice?", 2);
        assert_eq!(near, vec![2, 0]);
        assert_eq!(r.nearest("password reset please", 1), vec![3]);
        // Nothing in common: the first examples, in order; never more than there are.
        assert_eq!(r.nearest("zzz", 3), vec![0, 1, 2]);
        assert_eq!(r.nearest("zzz", 9).len(), 4);
    }
}
