//! The beginning of an LZ4 block without the rest: a base is stored as one block (what
//! every release reads), and a reader that wants only the catalog and aggregates at its
//! start fetches and decodes only the sequences that produce them.

/// An LZ4 block that does not decode (or ends before the bytes asked for).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// How many bytes of `block` (an LZ4 block) hold the sequences that decode to its first
/// `want` bytes: the block cut there still gives them to [`decode_prefix`].
pub(crate) fn covering(block: &[u8], want: usize) -> Result<usize, Corrupt> {
    walk(block, want, None)
}

/// The first `want` bytes `block` decodes to, where `block` is an LZ4 block or its
/// beginning cut at [`covering`].
pub(crate) fn decode_prefix(block: &[u8], want: usize) -> Result<Vec<u8>, Corrupt> {
    let mut out = Vec::with_capacity(want);
    walk(block, want, Some(&mut out))?;
    Ok(out)
}

/// Walks `block` one sequence at a time until `want` bytes are decoded, appending them
/// to `out` if given (no more than `want`); returns the bytes of `block` read.
fn walk(block: &[u8], want: usize, mut out: Option<&mut Vec<u8>>) -> Result<usize, Corrupt> {
    let (mut pos, mut len) = (0, 0usize);
    while len < want && pos < block.len() {
        let token = block[pos];
        pos += 1;
        let literals = length(block, &mut pos, usize::from(token >> 4))?;
        let end = pos.checked_add(literals).filter(|&end| end <= block.len()).ok_or(Corrupt)?;
        if let Some(out) = out.as_deref_mut() {
            out.extend_from_slice(&block[pos..pos + literals.min(want - len)]);
        }
        (pos, len) = (end, len + literals);
        if pos == block.len() {
            // The last sequence of a block has literals only.
            break;
        }
        let offset = usize::from(u16::from_le_bytes([block[pos], *block.get(pos + 1).ok_or(Corrupt)?]));
        pos += 2;
        if offset == 0 || offset > len {
            return Err(Corrupt);
        }
        let matched = length(block, &mut pos, usize::from(token & 15))?.checked_add(4).ok_or(Corrupt)?;
        if let Some(out) = out.as_deref_mut() {
            // Byte by byte: a match may overlap what it copies (a run).
            let start = len - offset;
            for i in 0..matched.min(want.saturating_sub(len)) {
                let byte = out[start + i];
                out.push(byte);
            }
        }
        len = len.checked_add(matched).ok_or(Corrupt)?;
    }
    if len < want {
        return Err(Corrupt);
    }
    Ok(pos)
}

/// A sequence's literal or match length: its `nibble`, and when that is 15, the bytes
/// after it added on while they are 255.
fn length(block: &[u8], pos: &mut usize, nibble: usize) -> Result<usize, Corrupt> {
    let mut n = nibble;
    if nibble == 15 {
        loop {
            let byte = *block.get(*pos).ok_or(Corrupt)?;
            *pos += 1;
            n = n.checked_add(usize::from(byte)).ok_or(Corrupt)?;
            if byte != 255 {
                break;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs with literals, short and long matches, overlapping runs and 15+ lengths.
    fn samples() -> Vec<Vec<u8>> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let text: Vec<u8> = (0..20_000u32).flat_map(|i| format!("USR{:04}#SESS{}|", i % 300, i % 7).into_bytes()).collect();
        let mut mixed = noise(3000);
        mixed.extend(vec![0u8; 5000]);
        mixed.extend(&text[..4000]);
        mixed.extend(noise(70));
        vec![text, mixed, noise(1000), vec![7u8; 100_000], b"short".to_vec()]
    }

    #[test]
    fn every_prefix_decodes_as_the_whole_block_begins_from_its_covering_sequences() {
        for input in samples() {
            let block = lz4_flex::block::compress(&input);
            let wants = [1, 2, 15, 16, 100, 4095, input.len() / 3, input.len() / 2, input.len() - 1, input.len()];
            for want in wants.into_iter().filter(|&w| w > 0 && w <= input.len()) {
                let cut = covering(&block, want).unwrap();
                assert!(cut <= block.len());
                assert_eq!(decode_prefix(&block[..cut], want).unwrap(), input[..want], "want {want} of {}", input.len());
                assert_eq!(decode_prefix(&block, want).unwrap(), input[..want]);
            }
            assert_eq!(covering(&block, input.len() + 1), Err(Corrupt), "past its end");
        }
    }

    #[test]
    fn a_cut_or_damaged_block_is_corrupt_not_a_panic() {
        let input = &samples()[1];
        let block = lz4_flex::block::compress(input);
        let want = input.len() / 2;
        let cut = covering(&block, want).unwrap();
        for short in [0, 1, cut / 2, cut - 1] {
            assert_eq!(decode_prefix(&block[..short], want), Err(Corrupt), "cut at {short} of {cut}");
        }
        for garbage in [vec![0xf0], vec![0xff, 255, 255], vec![0x10, b'a', 9, 0], vec![0x1f, b'a', 1, 0, 255, 255]] {
            assert_eq!(decode_prefix(&garbage, 1 << 20), Err(Corrupt), "{garbage:?}");
        }
    }
}
