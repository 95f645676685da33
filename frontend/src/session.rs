//! The admin token in the tab's session storage: it survives a reload but
//! not the closing of the tab, and other sites cannot read it.

const KEY: &str = "corral.admin-token";

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.session_storage().ok()?
}

pub fn load() -> Option<String> {
    storage()?
        .get_item(KEY)
        .ok()?
        .filter(|t| !t.trim().is_empty())
}

pub fn save(token: &str) {
    if let Some(s) = storage() {
        let _ = s.set_item(KEY, token);
    }
}

pub fn clear() {
    if let Some(s) = storage() {
        let _ = s.remove_item(KEY);
    }
}
