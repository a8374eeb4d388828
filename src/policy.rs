//! `decide`: the account rules as a pure function. (Being written.)
