//! [`PasswordHasher`]: argon2id hashing and verification on a pool of dedicated
//! threads (an actix `SyncArbiter`), so the tens of milliseconds and megabytes each
//! hash costs never block an event loop. Only the
//! [`Authenticator`](super::authenticator::Authenticator) talks to it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use actix::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use argon2::{
    password_hash::{rand_core::OsRng, SaltString},
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier as _, Version,
};
use tracing::{debug, error};

use crate::{error::ApiError, settings::AuthSettings};

/// Lanes of argon2id. One: parallelism comes from the pool's threads, each hashing
/// a different password.
const ARGON2_PARALLELISM: u32 = 1;

/// Password that the dummy hash is made from; never a valid password of anyone,
/// since verification against it only runs when there is no account.
const DUMMY_PASSWORD: &[u8] = b"roomcast-dummy-password-for-constant-time-sign-in";

/// Hashes a new password; the answer is a PHC string (`$argon2id$v=19$m=...`).
#[derive(Message)]
#[rtype(result = "Result<String, ApiError>")]
pub struct HashPassword {
    pub password: String,
}

/// Checks a password against a stored PHC string. With `hash: None` (no such
/// account, or an account without a password) it verifies against a fixed dummy
/// hash and answers `false`, so unknown usernames take as long as wrong passwords.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct VerifyPassword {
    pub password: String,
    pub hash: Option<String>,
}

/// One hashing thread. Start a pool with
/// `SyncArbiter::start(threads, move || PasswordHasher::new(&settings))` or
/// [`PasswordHasher::start`].
pub struct PasswordHasher {
    argon2: Argon2<'static>,
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
        let dummy_hash = shared_dummy_hash(&argon2);
        Self { argon2, dummy_hash }
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

/// argon2 cost parameters: memory (KiB), iterations, lanes.
type CostKey = (u32, u32, u32);

/// Dummy hashes by cost parameters, made once per process.
static DUMMY_HASHES: OnceLock<Mutex<HashMap<CostKey, Arc<str>>>> = OnceLock::new();

/// The dummy hash made with `argon2`'s parameters; the first caller makes it while
/// the others wait for it. `None` only if hashing itself fails.
fn shared_dummy_hash(argon2: &Argon2<'_>) -> Option<Arc<str>> {
    let params = argon2.params();
    let key = (params.m_cost(), params.t_cost(), params.p_cost());
    let mut hashes = DUMMY_HASHES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(hash) = hashes.get(&key) {
        return Some(hash.clone());
    }
    let hash: Arc<str> = match hash_with(argon2, DUMMY_PASSWORD) {
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

fn hash_with(argon2: &Argon2<'_>, password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(argon2.hash_password(password, &salt)?.to_string())
}

/// Verifies with the parameters recorded in `hash` (so hashes made with older
/// settings keep working); an unparsable hash never matches.
fn verify_with(argon2: &Argon2<'_>, password: &[u8], hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2.verify_password(password, &parsed).is_ok(),
        Err(e) => {
            error!(error = %e, "stored password hash cannot be parsed");
            false
        }
    }
}

impl Actor for PasswordHasher {
    type Context = SyncContext<Self>;
}

impl Handler<HashPassword> for PasswordHasher {
    type Result = Result<String, ApiError>;

    fn handle(&mut self, msg: HashPassword, _ctx: &mut SyncContext<Self>) -> Self::Result {
        hash_with(&self.argon2, msg.password.as_bytes()).map_err(ApiError::internal)
    }
}

impl Handler<VerifyPassword> for PasswordHasher {
    type Result = bool;

    fn handle(&mut self, msg: VerifyPassword, _ctx: &mut SyncContext<Self>) -> bool {
        match msg.hash {
            Some(hash) => verify_with(&self.argon2, msg.password.as_bytes(), &hash),
            None => {
                if let Some(dummy) = &self.dummy_hash {
                    let _ = verify_with(&self.argon2, msg.password.as_bytes(), dummy);
                } else {
                    debug!("no dummy hash; answering without the constant-time verification");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap_argon2() -> Argon2<'static> {
        let params = Params::new(Params::MIN_M_COST.max(64), 1, 1, None).expect("valid params");
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    #[test]
    fn hashes_verify_and_record_argon2id() {
        let argon2 = cheap_argon2();
        let hash = hash_with(&argon2, b"correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_with(&argon2, b"correct horse", &hash));
        assert!(!verify_with(&argon2, b"wrong horse", &hash));
        assert!(!verify_with(&argon2, b"correct horse", "not a phc string"));
    }

    #[test]
    fn the_dummy_hash_is_made_once_per_parameters() {
        let argon2 = cheap_argon2();
        let first = shared_dummy_hash(&argon2).expect("dummy hash");
        let second = shared_dummy_hash(&argon2).expect("dummy hash");
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!verify_with(&argon2, b"anything", &first));
    }

    #[test]
    fn default_settings_are_valid_params() {
        assert!(argon2_params(&AuthSettings::default()).is_ok());
    }
}
