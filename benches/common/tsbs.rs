//! A seeded TSBS "cpu-only"-like generator: 10 tags, 10 integer fields per row, rows
//! time-major (all hosts per timestamp), 10 s apart.

/// xorshift64*: deterministic and dependency-free.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-northeast-1"];
const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];

pub(crate) const START_NS: i64 = 1_704_067_200_000_000_000;
pub(crate) const INTERVAL_NS: i64 = 10_000_000_000;

/// The tag section of host `h` (without the leading measurement).
pub(crate) fn tags(h: usize) -> String {
    let region = REGIONS[h % REGIONS.len()];
    format!(
        "hostname=host_{h},region={region},datacenter={region}a,rack={},os=Ubuntu16.04LTS,arch=x64,team=SF,service={},service_version=1,service_environment=production",
        h % 100,
        h % 20
    )
}

/// `rows` lines of line protocol starting at row index `first_row` of the time-major sequence.
pub(crate) fn lines(hosts: usize, first_row: usize, rows: usize, rng: &mut Rng) -> String {
    let tag_sets: Vec<String> = (0..hosts).map(tags).collect();
    let mut out = String::with_capacity(rows * 260);
    for r in first_row..first_row + rows {
        let host = r % hosts;
        let ts = START_NS + (r / hosts) as i64 * INTERVAL_NS;
        out.push_str("cpu,");
        out.push_str(&tag_sets[host]);
        for (i, f) in FIELDS.iter().enumerate() {
            out.push(if i == 0 { ' ' } else { ',' });
            out.push_str(f);
            out.push('=');
            out.push_str(&(rng.next() % 100).to_string());
            out.push('i');
        }
        out.push(' ');
        out.push_str(&ts.to_string());
        out.push('\n');
    }
    out
}
