"""Package data for ``eval`` (general-knowledge questions, replay prompts), a package so wheels ship it."""
