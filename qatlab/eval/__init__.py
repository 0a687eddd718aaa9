from qatlab.eval.perplexity import TokenPerplexity, next_token_nll, perplexity

__all__ = ["TokenPerplexity", "next_token_nll", "perplexity"]
