pub mod bf16;
