"""May they: decisions about an authenticated identity, pure and synchronous.

Roles come from settings only (`admin_users`, `admin_groups`); an anonymous identity (auth
none, user "") is never an admin, so turning auth off never turns the admin API open by role.
"""

from __future__ import annotations

from router.admit.auth import Identity
from router.config import Settings


def is_admin(identity: Identity, settings: Settings) -> bool:
    """Whether the identity may use the admin API (a listed user, or in a listed group)."""
    if not identity.user:
        return False
    if identity.user in settings.admin_users:
        return True
    return not identity.groups.isdisjoint(settings.admin_groups)
