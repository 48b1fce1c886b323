"""Composing adapters: merging many into one (`merge_adapters`, YAML recipes).

The tensor math lives in `lorakit.ops.merge`; this package applies it to adapters attached
to a model and writes the result.
"""

from lorakit.compose.merge import AdapterEntry, MergeRecipe, load_recipe, merge_adapters, merged_factors, run_recipe

__all__ = ["AdapterEntry", "MergeRecipe", "load_recipe", "merge_adapters", "merged_factors", "run_recipe"]
