//! Ties store, dataplane, CNI config and HTTP together. (Being written.)

pub fn main() -> i32 {
    0
}
