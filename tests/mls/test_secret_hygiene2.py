"""Secret hygiene, second review (DESIGN.md: secrets never reach logs or repr()).

Decrypted application data is the confidential payload MLS protects: `ProcessedMessage` keeps it
out of repr(), and so must the lower-level objects that carry it after decryption
(`DecryptedPrivateMessage` -> `AuthenticatedContent` -> `FramedContent`, and the AEAD plaintext
`PrivateMessageContent`), which a caller of `mls.message_protection` may well log.
"""

from __future__ import annotations

from mls.crypto import get_crypto
from mls.framing import (
    ContentType,
    FramedContent,
    PrivateMessageContent,
    Sender,
    WireFormat,
)
from mls.group_context import GroupContext
from mls.message_protection import decrypt_private, protect_private, sign_framed_content
from mls.secret_tree import SecretTree

CRYPTO = get_crypto(1)
PLAINTEXT = b"TOP-SECRET-MEDIA-PLAN-0123456789"


def _texts(*objects: object) -> list[str]:
    return [f(obj) for obj in objects for f in (repr, str)]


def test_decrypted_application_data_stays_out_of_repr() -> None:
    encryption_secret, sender_data_secret = CRYPTO.random_secret(), CRYPTO.random_secret()
    sig_priv, sig_pub = CRYPTO.signature_key_pair()
    context = GroupContext(CRYPTO.suite, b"group", 3, b"th", b"cth")
    content = FramedContent(
        b"group", 3, Sender.member(1), b"", ContentType.application, application_data=PLAINTEXT
    )
    ac = sign_framed_content(CRYPTO, WireFormat.mls_private_message, content, sig_priv, context)
    message = protect_private(CRYPTO, ac, SecretTree(CRYPTO, encryption_secret, 2), sender_data_secret)
    decrypted = decrypt_private(
        CRYPTO,
        message,
        context,
        SecretTree(CRYPTO, encryption_secret, 2),
        sender_data_secret,
        lambda _: sig_pub,
    )
    opened = decrypted.authenticated_content
    # The data is there to be read, just not shown.
    assert opened.content.application_data == PLAINTEXT
    inner = PrivateMessageContent(ContentType.application, opened.auth, PLAINTEXT)
    assert PrivateMessageContent.decode(inner.encode(), ContentType.application) == inner
    for text in _texts(decrypted, opened, opened.content, content, ac, inner):
        assert "TOP-SECRET" not in text and PLAINTEXT.hex() not in text, text[:120]
    # What the repr is for (debugging the framing) is still shown.
    assert "application" in repr(opened.content) and "epoch=3" in repr(opened.content)
