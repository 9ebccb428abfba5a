"""The API by area, one ``APIRouter`` each: ranking (recommend), operations (health), admin."""
