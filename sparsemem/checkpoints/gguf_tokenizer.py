"""A `tokenizers` tokenizer rebuilt from a SentencePiece vocabulary stored in a GGUF file.

A GGUF has no `tokenizer.json`: it stores the pieces, their scores and their token types
(llama.cpp's `tokenizer.ggml.*` keys). For a SentencePiece BPE model (Gemma) that is enough
to rebuild an equivalent Hugging Face BPE with byte fallback, using `tokenizers` alone (no
torch, no sentencepiece): spaces become `▁`, no dummy prefix is added, and the merges are
recovered from the vocabulary in SentencePiece's priority order.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"


def sentencepiece_bpe(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                      bos_id: int, unk_id: int) -> Tokenizer:
    """Build the BPE tokenizer a SentencePiece vocabulary describes.

    - Pieces spelled with real spaces (Gemma stores its whitespace runs as `"  "`) are respelled
      with `▁`, the form the normalizer produces, so they are reachable by merges.
    - Control pieces (`<bos>`, `<start_of_turn>`, `<unusedN>`, ...) become special added tokens;
      other user-defined pieces (newline and tab runs, HTML tags) become plain added tokens, so
      they are matched whole as SentencePiece does. The space runs stay ordinary BPE pieces; their
      merges rank first (below), which also yields them whole for runs up to the longest piece.
    - Merge priority follows SentencePiece: non-normal pieces by id first, then normal pieces by
      descending score (ties by id). In Gemma's file a normal piece scores exactly `-(id - 494)`,
      so this is plain file order, which is also what transformers' GGUF conversion uses.
    """
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"GGUF tokenizer arrays disagree: {len(tokens)} tokens, {len(scores)} scores, "
                         f"{len(types)} token types; the file's tokenizer metadata is damaged")
    pieces = [t.replace(" ", SPACE) for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("GGUF vocabulary has duplicate pieces after spelling spaces as '▁'; "
                         "it is not a SentencePiece BPE vocabulary this converter understands")
    order = sorted(range(len(pieces)), key=lambda i: (types[i] == NORMAL, -scores[i] if types[i] == NORMAL else 0, i))
    merges = []
    for i in order:
        piece = pieces[i]
        for cut in range(len(piece) - 1, 0, -1):  # longer left part first, as transformers does
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True)
                            for p, ty in zip(pieces, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(p, normalized=False, special=False)
                    for p, t, ty in zip(pieces, tokens, types) if ty == USER_DEFINED and " " not in t])
    bos = pieces[bos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
    return tok
