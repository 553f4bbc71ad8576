//! [`PasswordHasher`]: argon2id hashing and verification on a pool of dedicated
//! threads (an actix `SyncArbiter`), so the tens of milliseconds and megabytes each
//! hash costs never block an event loop. Only the
//! [`Authenticator`](super::authenticator::Authenticator) talks to it, through a
//! [`HasherQueue`].
//!
//! Hashing is the one thing an anonymous client can make the server spend real
//! CPU on, so the queue in front of the threads is bounded: when
//! `auth.hasher_max_pending` jobs wait or run, further ones are refused at once
//! with `unavailable` instead of queueing behind a flood, and a job whose caller
//! went away (its request was cancelled or timed out) is skipped, not hashed.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use argon2::{
    password_hash::{self, rand_core::OsRng, Output, ParamsString, Salt, SaltString},
    Algorithm, Argon2, Block, Params, PasswordHash, Version, ARGON2ID_IDENT,
};
use subtle::ConstantTimeEq as _;
use tracing::{debug, error};

use crate::{
    error::{ApiError, Code},
    settings::AuthSettings,
};

/// Lanes of argon2id. One: parallelism comes from the pool's threads, each hashing
/// a different password.
const ARGON2_PARALLELISM: u32 = 1;

/// Bytes of a new hash's output (argon2's default, as `Argon2::hash_password` makes).
const OUTPUT_LEN: usize = Params::DEFAULT_OUTPUT_LEN;

/// Password that the dummy hash is made from; never a valid password of anyone,
/// since verification against it only runs when there is no account.
const DUMMY_PASSWORD: &[u8] = b"roomcast-dummy-password-for-constant-time-sign-in";

/// Hashes a new password; the answer is a PHC string (`$argon2id$v=19$m=...`).
/// `canceled` when the caller went away before a thread got to it.
#[derive(Message)]
#[rtype(result = "Result<String, ApiError>")]
pub struct HashPassword {
    pub password: String,
    pub caller: Caller,
}

/// Checks a password against a stored PHC string. With `hash: None` (no such
/// account, or an account without a password) it verifies against a fixed dummy
/// hash and answers `false`, so unknown usernames take as long as wrong passwords.
/// `canceled` when the caller went away before a thread got to it.
#[derive(Message)]
#[rtype(result = "Result<bool, ApiError>")]
pub struct VerifyPassword {
    pub password: String,
    pub hash: Option<String>,
    pub caller: Caller,
}

/// Whether whoever asked for a hashing job still waits for it. The request that
/// started the job holds a [`CallerAlive`]; when its future is dropped (client
/// gone, deadline passed) the job gives its place in the queue up at once and is
/// skipped when a thread reaches it.
#[derive(Debug, Clone, Default)]
pub struct Caller(Option<tokio::sync::watch::Receiver<()>>);

impl Caller {
    /// A caller that is never considered gone (start-up, the CLI).
    pub fn detached() -> Self {
        Self(None)
    }

    /// Whether the caller stopped waiting.
    pub fn is_gone(&self) -> bool {
        self.0.as_ref().is_some_and(|rx| rx.has_changed().is_err())
    }

    /// Completes when the caller stops waiting (never for a detached one).
    async fn gone(&self) {
        match &self.0 {
            // Nothing is ever sent: `changed` only returns when the sender is dropped.
            Some(rx) => {
                let mut rx = rx.clone();
                while rx.changed().await.is_ok() {}
            }
            None => std::future::pending().await,
        }
    }
}

/// Held by a request for as long as it waits for its answer; see [`Caller`].
#[derive(Debug)]
pub struct CallerAlive(tokio::sync::watch::Sender<()>);

impl Default for CallerAlive {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(()))
    }
}

impl CallerAlive {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle that travels with the request's messages.
    pub fn caller(&self) -> Caller {
        Caller(Some(self.0.subscribe()))
    }
}

/// The bounded way to the hashing threads: at most `max_pending` jobs whose
/// callers still wait are queued or running at once; more are refused with
/// `unavailable` without queueing. A job whose caller left frees its place at
/// once and costs its thread only a check when reached. Cheap to clone; clones
/// share the count.
#[derive(Clone)]
pub struct HasherQueue {
    hasher: Addr<PasswordHasher>,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
}

/// Counts one admitted job until it is answered or dropped.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HasherQueue {
    /// A queue of at most `max_pending` (at least one) jobs in front of `hasher`.
    pub fn new(hasher: Addr<PasswordHasher>, max_pending: usize) -> Self {
        Self {
            hasher,
            pending: Arc::new(AtomicUsize::new(0)),
            max_pending: max_pending.max(1),
        }
    }

    /// Jobs waiting or running now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    fn admit(&self) -> Result<Admitted, ApiError> {
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_pending).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Ok(Admitted(self.pending.clone()))
        } else {
            debug!(
                max_pending = self.max_pending,
                "password hashing queue full; request refused"
            );
            Err(ApiError::unavailable(
                "the server is busy checking passwords; retry in a few seconds",
            ))
        }
    }

    /// Hashes a new password (see [`HashPassword`]).
    pub async fn hash(&self, password: String, caller: Caller) -> Result<String, ApiError> {
        let _admitted = self.admit()?;
        let job = self.hasher.send(HashPassword {
            password,
            caller: caller.clone(),
        });
        // The place in the queue is given up as soon as the caller leaves.
        tokio::select! {
            answer = job => answer?,
            () = caller.gone() => Err(caller_gone()),
        }
    }

    /// Verifies a password (see [`VerifyPassword`]).
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
        caller: Caller,
    ) -> Result<bool, ApiError> {
        let _admitted = self.admit()?;
        let job = self.hasher.send(VerifyPassword {
            password,
            hash,
            caller: caller.clone(),
        });
        tokio::select! {
            answer = job => answer?,
            () = caller.gone() => Err(caller_gone()),
        }
    }
}

/// The answer to a job whose caller went away.
fn caller_gone() -> ApiError {
    debug!("password hashing job skipped: its caller went away");
    ApiError::new(Code::Canceled, "the request was cancelled")
}

/// One hashing thread. Start a pool with
/// `SyncArbiter::start(threads, move || PasswordHasher::new(&settings))` or
/// [`PasswordHasher::start`].
pub struct PasswordHasher {
    argon2: Argon2<'static>,
    /// This thread's argon2 working memory, reused by every hash and verification.
    memory: Memory,
    /// The dummy hash for these parameters, shared by every thread of the process.
    dummy_hash: Option<Arc<str>>,
}

impl PasswordHasher {
    /// A hasher with the configured argon2id cost. Runs on the hashing thread (the
    /// `SyncArbiter` factory), where it also makes the dummy hash if no other thread
    /// has made it yet. Cost parameters outside argon2's range fall back to
    /// argon2's defaults, with an error logged; [`PasswordHasher::start`] refuses them.
    pub fn new(settings: &AuthSettings) -> Self {
        let params = argon2_params(settings).unwrap_or_else(|e| {
            error!(error = %e, "invalid argon2 parameters in auth settings; using argon2's defaults");
            Params::default()
        });
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut memory = Memory::default();
        let dummy_hash = shared_dummy_hash(&argon2, &mut memory);
        Self {
            argon2,
            memory,
            dummy_hash,
        }
    }

    /// Starts `settings.hasher_threads` hashing threads. Fails when the cost
    /// parameters are out of argon2's range.
    pub fn start(settings: &AuthSettings) -> Result<Addr<Self>, argon2::Error> {
        argon2_params(settings)?;
        let settings = settings.clone();
        Ok(SyncArbiter::start(
            settings.hasher_threads.max(1),
            move || PasswordHasher::new(&settings),
        ))
    }
}

/// The argon2 working memory of one hashing thread (`m_cost` KiB: 19 MiB by
/// default), allocated at its first use and kept for the thread's life.
///
/// `Argon2::hash_password` allocates and frees this much for every hash; glibc
/// raises its mmap threshold after the first such buffer is freed and keeps the
/// later ones in its arenas, so a server that handled a few sign-ins stayed at
/// hundreds of megabytes. With one such buffer per thread, RSS stays at about
/// `hasher_threads` × `m_cost`.
///
/// It only grows: a stored hash with a higher memory cost than the configured one
/// grows it to that cost for good (argon2 only uses the first `block_count` blocks).
/// Stale contents need no clearing: argon2 overwrites every block in its first pass
/// before reading it.
#[derive(Default)]
struct Memory {
    blocks: Vec<Block>,
}

impl Memory {
    /// `params.block_count()` blocks, growing the memory to them if it is smaller.
    fn blocks_for(&mut self, params: &Params) -> &mut [Block] {
        let count = params.block_count();
        if self.blocks.len() < count {
            if !self.blocks.is_empty() {
                debug!(
                    from_blocks = self.blocks.len(),
                    to_blocks = count,
                    "growing the argon2 memory of this hashing thread"
                );
            }
            self.blocks.reserve_exact(count - self.blocks.len());
            self.blocks.resize(count, Block::default());
        }
        &mut self.blocks[..count]
    }
}

/// argon2 cost parameters: memory (KiB), iterations, lanes.
type CostKey = (u32, u32, u32);

/// Dummy hashes by cost parameters, made once per process.
static DUMMY_HASHES: OnceLock<Mutex<HashMap<CostKey, Arc<str>>>> = OnceLock::new();

/// The dummy hash made with `argon2`'s parameters; the first caller makes it while
/// the others wait for it. `None` only if hashing itself fails.
fn shared_dummy_hash(argon2: &Argon2<'_>, memory: &mut Memory) -> Option<Arc<str>> {
    let params = argon2.params();
    let key = (params.m_cost(), params.t_cost(), params.p_cost());
    let mut hashes = DUMMY_HASHES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(hash) = hashes.get(&key) {
        return Some(hash.clone());
    }
    let hash: Arc<str> = match hash_with(argon2, memory, DUMMY_PASSWORD) {
        Ok(hash) => hash.into(),
        Err(e) => {
            error!(error = %e, "cannot make the dummy password hash");
            return None;
        }
    };
    hashes.insert(key, hash.clone());
    Some(hash)
}

/// The argon2id parameters of `settings`.
pub fn argon2_params(settings: &AuthSettings) -> Result<Params, argon2::Error> {
    Params::new(
        settings.argon2_memory_kib,
        settings.argon2_iterations,
        ARGON2_PARALLELISM,
        None,
    )
}

/// Hashes `password` with a random salt into a PHC string
/// (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`), the same string
/// `Argon2::hash_password` makes, but in `memory`. `argon2` must be argon2id v19.
fn hash_with(
    argon2: &Argon2<'_>,
    memory: &mut Memory,
    password: &[u8],
) -> Result<String, password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; Salt::MAX_LENGTH];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_bytes)?;
    let params = argon2.params();
    let mut out = [0u8; OUTPUT_LEN];
    argon2.hash_password_into_with_memory(
        password,
        salt_bytes,
        &mut out,
        memory.blocks_for(params),
    )?;
    let hash = PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out)?),
    };
    Ok(hash.to_string())
}

/// Verifies with the algorithm (argon2id, argon2i or argon2d), version, parameters
/// and salt recorded in `hash` (so hashes made with older settings keep working),
/// in `memory`; an unparsable or unusable hash never matches.
fn verify_with(memory: &mut Memory, password: &[u8], hash: &str) -> bool {
    let parsed = match PasswordHash::new(hash) {
        Ok(parsed) => parsed,
        Err(e) => {
            error!(error = %e, "stored password hash cannot be parsed");
            return false;
        }
    };
    match matches(memory, password, &parsed) {
        Ok(matches) => matches,
        Err(e) => {
            error!(error = %e, algorithm = %parsed.algorithm, "stored password hash cannot be used");
            false
        }
    }
}

/// Whether `password` hashes to `hash`'s output, compared in constant time. What
/// `PasswordVerifier::verify_password` of `argon2` does, but in `memory`.
fn matches(
    memory: &mut Memory,
    password: &[u8],
    hash: &PasswordHash<'_>,
) -> Result<bool, password_hash::Error> {
    let algorithm = Algorithm::try_from(hash.algorithm)?;
    let version = match hash.version {
        Some(version) => Version::try_from(version)?,
        None => Version::default(),
    };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return Err(password_hash::Error::PhcStringField);
    };
    // m, t, p (and keyid, data), with the output length of `expected`.
    let params = Params::try_from(hash)?;
    let mut salt_bytes = [0u8; Salt::MAX_LENGTH];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    let argon2 = Argon2::new(algorithm, version, params);
    argon2.hash_password_into_with_memory(
        password,
        salt_bytes,
        out,
        memory.blocks_for(argon2.params()),
    )?;
    Ok(bool::from(out.ct_eq(expected.as_bytes())))
}

impl Actor for PasswordHasher {
    type Context = SyncContext<Self>;
}

impl Handler<HashPassword> for PasswordHasher {
    type Result = Result<String, ApiError>;

    fn handle(&mut self, msg: HashPassword, _ctx: &mut SyncContext<Self>) -> Self::Result {
        if msg.caller.is_gone() {
            return Err(caller_gone());
        }
        hash_with(&self.argon2, &mut self.memory, msg.password.as_bytes())
            .map_err(ApiError::internal)
    }
}

impl Handler<VerifyPassword> for PasswordHasher {
    type Result = Result<bool, ApiError>;

    fn handle(&mut self, msg: VerifyPassword, _ctx: &mut SyncContext<Self>) -> Self::Result {
        if msg.caller.is_gone() {
            return Err(caller_gone());
        }
        Ok(match msg.hash {
            Some(hash) => verify_with(&mut self.memory, msg.password.as_bytes(), &hash),
            None => {
                if let Some(dummy) = &self.dummy_hash {
                    let _ = verify_with(&mut self.memory, msg.password.as_bytes(), dummy);
                } else {
                    debug!("no dummy hash; answering without the constant-time verification");
                }
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use argon2::{PasswordHasher as _, PasswordVerifier as _};

    use super::*;

    fn cheap_params(m_cost: u32, t_cost: u32) -> Params {
        Params::new(m_cost, t_cost, 1, None).expect("valid params")
    }

    fn cheap_argon2() -> Argon2<'static> {
        Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            cheap_params(Params::MIN_M_COST.max(64), 1),
        )
    }

    /// Verification by the `argon2` crate itself (its `PasswordVerifier`).
    fn crate_verifies(password: &[u8], hash: &str) -> bool {
        let parsed = PasswordHash::new(hash).expect("PHC string");
        Argon2::default().verify_password(password, &parsed).is_ok()
    }

    /// A hash made by the `argon2` crate's `PasswordHasher`, with its own allocation.
    fn crate_hash(algorithm: Algorithm, params: Params, password: &[u8]) -> String {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(algorithm, Version::V0x13, params)
            .hash_password(password, &salt)
            .expect("hash")
            .to_string()
    }

    #[test]
    fn hashes_verify_and_record_argon2id() {
        let argon2 = cheap_argon2();
        let mut memory = Memory::default();
        let hash = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{hash}");
        let parsed = PasswordHash::new(&hash).expect("PHC string");
        assert_eq!(parsed.salt.expect("salt").len(), 22, "16 bytes of salt");
        assert_eq!(parsed.hash.expect("output").len(), OUTPUT_LEN);
        assert!(verify_with(&mut memory, b"correct horse", &hash));
        assert!(!verify_with(&mut memory, b"wrong horse", &hash));
        assert!(!verify_with(&mut memory, b"", &hash));
        assert!(!verify_with(
            &mut memory,
            b"correct horse",
            "not a phc string"
        ));
        // Two hashes of one password differ by their salts.
        let again = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
        assert_ne!(hash, again);
        assert!(verify_with(&mut memory, b"correct horse", &again));
    }

    #[test]
    fn new_hashes_verify_with_the_argon2_crate() {
        let argon2 = cheap_argon2();
        let mut memory = Memory::default();
        for _ in 0..3 {
            let hash = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
            assert!(crate_verifies(b"correct horse", &hash), "{hash}");
            assert!(!crate_verifies(b"wrong horse", &hash), "{hash}");
        }
        // With the default cost too, as the server hashes.
        let argon2 = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            argon2_params(&AuthSettings::default()).expect("valid params"),
        );
        let hash = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(crate_verifies(b"correct horse", &hash));
        assert!(verify_with(&mut memory, b"correct horse", &hash));
    }

    #[test]
    fn hashes_of_the_argon2_crate_verify() {
        let mut memory = Memory::default();
        let hash = crate_hash(Algorithm::Argon2id, cheap_params(64, 1), b"correct horse");
        assert!(verify_with(&mut memory, b"correct horse", &hash));
        assert!(!verify_with(&mut memory, b"wrong horse", &hash));
        // argon2i and argon2d too, and outputs of other lengths than 32 bytes.
        for algorithm in [Algorithm::Argon2i, Algorithm::Argon2d] {
            let hash = crate_hash(algorithm, cheap_params(64, 1), b"correct horse");
            assert!(hash.starts_with(&format!("${}$", algorithm.as_str())));
            assert!(verify_with(&mut memory, b"correct horse", &hash), "{hash}");
            assert!(!verify_with(&mut memory, b"wrong horse", &hash), "{hash}");
        }
        for output_len in [16, 64] {
            let params = Params::new(64, 1, 1, Some(output_len)).expect("valid params");
            let hash = crate_hash(Algorithm::Argon2id, params, b"correct horse");
            assert!(verify_with(&mut memory, b"correct horse", &hash), "{hash}");
            assert!(!verify_with(&mut memory, b"wrong horse", &hash), "{hash}");
        }
    }

    #[test]
    fn reference_implementation_vectors_verify() {
        // From the argon2 reference implementation (the `argon2` crate's KATs).
        let mut memory = Memory::default();
        for hash in [
            "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            "$argon2id$v=19$m=256,t=2,p=2$c29tZXNhbHQ$bQk8UB/VmZZF4Oo79iDXuL5/0ttZwg2f/5U52iv1cDc",
            "$argon2i$v=16$m=256,t=2,p=1$c29tZXNhbHQ$/U3YPXYsSb3q9XxHvc0MLxur+GP960kN9j7emXX8zwY",
        ] {
            assert!(verify_with(&mut memory, b"password", hash), "{hash}");
            assert!(!verify_with(&mut memory, b"passwore", hash), "{hash}");
        }
    }

    #[test]
    fn hashes_with_other_costs_verify_in_grown_memory() {
        let argon2 = cheap_argon2();
        let mut memory = Memory::default();
        let own = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
        assert_eq!(memory.blocks.len(), 64);
        // A higher memory cost grows the memory, for good.
        let bigger = crate_hash(Algorithm::Argon2id, cheap_params(256, 3), b"correct horse");
        assert!(verify_with(&mut memory, b"correct horse", &bigger));
        assert!(!verify_with(&mut memory, b"wrong horse", &bigger));
        assert_eq!(memory.blocks.len(), 256);
        // Lower costs, and the configured ones again, use a part of it.
        let smaller = crate_hash(Algorithm::Argon2id, cheap_params(32, 2), b"correct horse");
        assert!(verify_with(&mut memory, b"correct horse", &smaller));
        assert!(!verify_with(&mut memory, b"wrong horse", &smaller));
        assert!(verify_with(&mut memory, b"correct horse", &own));
        assert!(!verify_with(&mut memory, b"wrong horse", &own));
        assert_eq!(memory.blocks.len(), 256);
        // New hashes made in the grown memory are still right.
        let after = hash_with(&argon2, &mut memory, b"correct horse").expect("hash");
        assert!(crate_verifies(b"correct horse", &after));
    }

    #[test]
    fn unusable_hashes_never_match() {
        let mut memory = Memory::default();
        for hash in [
            // Another algorithm.
            "$scrypt$ln=4,r=8,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            // An unknown version.
            "$argon2id$v=18$m=256,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            // An unknown parameter.
            "$argon2id$v=19$m=256,t=2,p=1,x=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            // Out of argon2's range.
            "$argon2id$v=19$m=1,t=2,p=1$c29tZXNhbHQ$nf65EOgLrQMR/uIPnA4rEsF5h7TKyQwu9U1bMCHGi/4",
            // No output, or no salt and no output.
            "$argon2id$v=19$m=256,t=2,p=1$c29tZXNhbHQ",
            "$argon2id$v=19$m=256,t=2,p=1",
            "",
        ] {
            assert!(!verify_with(&mut memory, b"password", hash), "{hash}");
        }
    }

    #[test]
    fn the_dummy_hash_is_made_once_per_parameters() {
        let argon2 = cheap_argon2();
        let mut memory = Memory::default();
        let first = shared_dummy_hash(&argon2, &mut memory).expect("dummy hash");
        let second = shared_dummy_hash(&argon2, &mut memory).expect("dummy hash");
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!verify_with(&mut memory, b"anything", &first));
        assert!(verify_with(&mut memory, DUMMY_PASSWORD, &first));
        assert!(crate_verifies(DUMMY_PASSWORD, &first));
    }

    #[test]
    fn default_settings_are_valid_params() {
        assert!(argon2_params(&AuthSettings::default()).is_ok());
    }
}
