"""Nearest-code search speed: lqae's exact chunked cosine search vs a plain matmul of the same shape
and vs vector-quantize-pytorch's cosine VectorQuantize on a frozen codebook (when installed).

Usage: python bench/quantizer.py [--tokens 16384] [--codes 30522] [--dim 384] [--repeats 5]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lqae.model.codebook.search import nearest_codes




from _timing import best_time  # noqa: E402 (bench/ is on sys.path when run as a script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="encoder outputs to quantize (64 images x 256)")
    parser.add_argument("--codes", type=int, default=30522, help="codebook rows (BERT vocabulary)")
    parser.add_argument("--dim", type=int, default=384, help="embedding width (MiniLM)")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per search chunk")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    codebook = torch.randn(args.codes, args.dim) * 0.05
    normalized = F.normalize(codebook, dim=-1)
    vectors = torch.randn(args.tokens, args.dim)
    queries = F.normalize(vectors, dim=-1)

    ours_ids = nearest_codes(vectors, normalized, args.chunk)
    result = {
        "tokens": args.tokens, "codes": args.codes, "dim": args.dim, "chunk": args.chunk,
        "threads": torch.get_num_threads(),
        "matmul_s": best_time(lambda: queries @ normalized.T, args.repeats),
        "lqae_s": best_time(lambda: nearest_codes(vectors, normalized, args.chunk), args.repeats),
    }
    result["lqae_vs_matmul"] = result["lqae_s"] / result["matmul_s"]

    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        result["vqp_s"] = None
    else:
        vq = VectorQuantize(dim=args.dim, codebook_size=args.codes, use_cosine_sim=True, freeze_codebook=True)
        with torch.no_grad():
            vq._codebook.embed.copy_(normalized.unsqueeze(0))
            vq._codebook.initted.fill_(True)
        vq.eval()
        batch = vectors.unsqueeze(0)  # (1, N, D)

        def run_vqp():
            with torch.no_grad():
                return vq(batch)[1]

        vqp_ids = run_vqp().flatten()
        result["vqp_s"] = best_time(run_vqp, args.repeats)
        result["vqp_vs_lqae"] = result["vqp_s"] / result["lqae_s"]
        result["agree_with_vqp"] = float((vqp_ids == ours_ids).float().mean())

    exact = (queries @ normalized.T).argmax(-1)
    result["agree_with_exact"] = float((exact == ours_ids).float().mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
