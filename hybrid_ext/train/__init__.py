"""The training core shared by `hybrid-ext demo` and the recipes: data, model, loop, logging contract."""
