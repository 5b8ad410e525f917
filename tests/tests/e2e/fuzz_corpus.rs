//! The fuzz targets' short run on every test run: every file of `fuzz/corpus/TARGET`
//! through its target, then seeded mutations of each (bit flips, truncations, splices)
//! and seeded random inputs. A panic fails the test and names the input that caused it.
//! Long runs use cargo-fuzz on the same targets (`fuzz/`).

use std::path::Path;

/// Mutations per corpus file, and random inputs per target.
const MUTATIONS_PER_FILE: usize = 300;
const RANDOM_INPUTS: usize = 500;

/// xorshift64*: small, seeded, reproducible.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }
}

fn mutate(random: &mut Random, input: &[u8]) -> Vec<u8> {
    let mut bytes = input.to_vec();
    match random.below(4) {
        0 if !bytes.is_empty() => {
            for _ in 0..=random.below(4) {
                let at = random.below(bytes.len());
                bytes[at] ^= 1 << random.below(8);
            }
        }
        1 => bytes.truncate(random.below(bytes.len() + 1)),
        2 => {
            let at = random.below(bytes.len() + 1);
            let insert: Vec<u8> = (0..random.below(16)).map(|_| random.next() as u8).collect();
            bytes.splice(at..at, insert);
        }
        _ => {
            let at = random.below(bytes.len() + 1);
            let copy = bytes[..at].to_vec();
            bytes.extend_from_slice(&copy);
        }
    }
    bytes
}

fn run(target: &str, input: &[u8], what: &str) {
    let function = kairos_ops::fuzz::target(target).expect("a known target");
    let outcome = std::panic::catch_unwind(|| function(input));
    assert!(
        outcome.is_ok(),
        "fuzz target {target} panicked on {what}: {:?}",
        String::from_utf8_lossy(input)
    );
}

#[test]
fn every_target_survives_its_corpus_mutations_and_random_bytes() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut targets = 0;
    for entry in std::fs::read_dir(&corpus).expect("fuzz/corpus exists") {
        let directory = entry.unwrap().path();
        let target = directory
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            kairos_ops::fuzz::target(&target).is_some(),
            "fuzz/corpus/{target} names no target"
        );
        targets += 1;
        let mut random = Random(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        let mut files = 0;
        for file in std::fs::read_dir(&directory).unwrap() {
            let path = file.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            run(&target, &input, &path.display().to_string());
            for round in 0..MUTATIONS_PER_FILE {
                let mutated = mutate(&mut random, &input);
                run(
                    &target,
                    &mutated,
                    &format!("mutation {round} of {}", path.display()),
                );
            }
            files += 1;
        }
        assert!(files > 0, "fuzz/corpus/{target} is empty");
        for round in 0..RANDOM_INPUTS {
            let input: Vec<u8> = (0..random.below(512))
                .map(|_| random.next() as u8)
                .collect();
            run(&target, &input, &format!("random input {round}"));
        }
    }
    assert_eq!(targets, 4, "a corpus for each of the four targets");
}
