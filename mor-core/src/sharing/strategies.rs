//! Built-in sharing strategies. (Implemented by the foundation work.)
