//! Each token's bytes, as it writes them into the text: what constrained
//! decoding checks a token against before it is chosen.

use super::{gpt2_byte_chars, Tokenizer};
use std::collections::HashMap;

impl Tokenizer {
    /// The bytes each token id writes into the text, indexed by id; `None`
    /// for special tokens (which write no text of their own) and for ids with
    /// no token. Byte-level BPEs map their stand-in characters back to bytes;
    /// SentencePiece vocabularies write `▁` as a space and `<0xNN>` as byte NN.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let inner = &self.inner;
        let byte_level =
            serde_json::to_string(&inner.get_decoder()).is_ok_and(|d| d.contains("\"ByteLevel\""));
        let stand_ins: HashMap<char, u8> = gpt2_byte_chars()
            .iter()
            .enumerate()
            .filter_map(|(b, s)| Some((s.chars().next()?, b as u8)))
            .collect();
        let added = inner.get_added_tokens_decoder();
        (0..self.vocab_size() as u32)
            .map(|id| {
                if let Some(token) = added.get(&id) {
                    return (!token.special).then(|| token.content.as_bytes().to_vec());
                }
                let token = inner.id_to_token(id)?;
                if byte_level {
                    return token.chars().map(|c| stand_ins.get(&c).copied()).collect();
                }
                let hex = token
                    .strip_prefix("<0x")
                    .and_then(|t| t.strip_suffix('>'))
                    .filter(|h| h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => Some(vec![byte]),
                    None => Some(token.replace('▁', " ").into_bytes()),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's bytes, joined, are the decoded text.
    #[test]
    fn token_bytes_spell_the_text() {
        let tokenizer = Tokenizer::byte_level_chatml().unwrap();
        let bytes = tokenizer.token_bytes();
        let text = "{\"category\": \"billing\", \"note\": \"café\"}";
        let ids = tokenizer.encode(text, false).unwrap();
        let spelled: Vec<u8> = ids
            .iter()
            .flat_map(|&i| bytes[i as usize].clone().unwrap())
            .collect();
        assert_eq!(spelled, text.as_bytes());
        let end = tokenizer.token_to_id("<|im_end|>").unwrap();
        assert_eq!(bytes[end as usize], None, "special tokens write no text");
    }
}
